"""Nothing wrong goes unnoticed (issue 18), without Ray: foreign shards refused by name,
truncated / missing shards and broken manifests as one clear line (no traceback, nonzero exit),
`inspect --verify` on an empty dataset, and `rayseg doctor` over a dataset. The Ray-side cases
(partition repair, pseudo-label provenance, an interrupted sweep, a run failing early) live
beside their jobs in test_partition_job.py, test_train.py and test_tune.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from rayseg import cli
from rayseg.data import shards
from test_shards import make_scene


def make_dataset(root, n: int = 3, num_classes: int = 20):
    for i in range(n):
        shards.write_scene(root, _scene(f"scene{i:04d}_00", "train" if i < n - 1 else "val", num_classes, seed=i))
    shards.write_manifest(root, "scannet20")
    return root


def _scene(sid: str, split: str, num_classes: int, seed: int = 0) -> dict:
    scene = make_scene(sid, split, n=300, views=1, seed=seed)
    tags = np.zeros(num_classes, np.uint8)
    tags[: min(num_classes, 3)] = 1
    scene["tags"] = tags
    scene["label"] = np.minimum(scene["label"], num_classes - 1).astype(np.uint8)
    return scene


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_clear_line(err: str) -> str:
    """stderr holds one error line (plus the RAYSEG_TRACEBACK hint), never a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and "RAYSEG_TRACEBACK" not in line]
    assert len(lines) == 1, err
    return lines[0]


def test_foreign_shard_is_refused_naming_the_file(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds")
    before = (root / shards.MANIFEST_NAME).read_text()
    # A 13-class (S3DIS) scene dropped into a 20-class folder: previously listed by the next
    # manifest write, accepted by partition, and fatal only in training, naming no file.
    shards.write_scene(root, _scene("Area_1_office_1", "train", 13))
    with pytest.raises(shards.ShardError, match=r"train/Area_1_office_1.parquet: 13 class tags, but this is a "
                                                r"scannet20 dataset \(20 classes\)"):
        shards.write_manifest(root, None)
    assert (root / shards.MANIFEST_NAME).read_text() == before  # the manifest is left as it was
    problems = shards.verify(root)
    assert len(problems) == 1 and "Area_1_office_1.parquet: extra file not in the manifest, foreign" in problems[0]
    code, out, _ = run_cli(capsys, "inspect", str(root), "--verify")
    assert code == 1 and "13 class tags" in out
    # refresh_manifest_entry (what update_scene users call) refuses it the same way
    with pytest.raises(shards.ShardError, match="13 class tags"):
        shards.refresh_manifest_entry(root, root / "train" / "Area_1_office_1.parquet")

    # A sound scene copied under another scene's name is foreign too (its path lies).
    (root / "train" / "Area_1_office_1.parquet").unlink()
    shutil.copy(root / "train" / "scene0000_00.parquet", root / "train" / "scene0099_00.parquet")
    with pytest.raises(shards.ShardError, match=r"scene0099_00.parquet: holds scene 'scene0000_00'"):
        shards.write_manifest(root, None)
    (root / "train" / "scene0099_00.parquet").unlink()

    # A manifest written before this check (it lists the foreign file): readers refuse it by name.
    shards.write_scene(root, _scene("Area_1_office_1", "train", 13))
    manifest = json.loads(before)
    manifest["scenes"].append(shards._file_entry(root, root / "train" / "Area_1_office_1.parquet", None))
    manifest["scenes"][-1].pop("missing_columns")
    (root / shards.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(shards.ShardError, match=r"Area_1_office_1.parquet: 13 class tags, the dataset has 20"):
        shards.scene_paths(root, "train")


def test_truncated_missing_and_broken_data_are_one_line(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds")
    shard = root / "train" / "scene0001_00.parquet"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(shards.ShardError, match=rf"scene0001_00.parquet: {size // 2} bytes, .* says {size}: truncated"):
        shards.scene_paths(root)

    cfg = tmp_path / "exp.toml"
    cfg.write_text(f"[data]\nroot = '{root}'\nloader = 'ray'\n")
    # inspect without --verify used to crash on the unreadable footer, naming nothing
    code, _, err = run_cli(capsys, "inspect", str(root))
    assert code == 2 and "scene0001_00.parquet" in one_clear_line(err)
    # the Ray Data path: named before Ray reads the file ("Parquet magic bytes not found" otherwise)
    code, _, err = run_cli(capsys, "stream", str(cfg), "--ray", "--batches", "1")
    assert code == 2 and "scene0001_00.parquet" in one_clear_line(err) and "truncated" in err
    code, _, err = run_cli(capsys, "train", str(cfg))
    assert code == 2 and "scene0001_00.parquet" in one_clear_line(err)
    # --resume: the run's own config names the same dataset
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(cfg.read_text())
    code, _, err = run_cli(capsys, "train", "--resume", str(run_dir))
    assert code == 2 and "scene0001_00.parquet" in one_clear_line(err)

    shard.unlink()  # a missing shard
    code, _, err = run_cli(capsys, "train", str(cfg))
    assert code == 2 and "scene0001_00.parquet" in one_clear_line(err) and "does not exist" in err

    (root / shards.MANIFEST_NAME).write_text("{}")  # an empty manifest
    code, _, err = run_cli(capsys, "train", str(cfg))
    assert code == 2 and "not a rayseg manifest" in one_clear_line(err)

    cfg.write_text(f"[data]\nroot = '{tmp_path / 'nowhere'}'\n")  # a missing data root
    code, _, err = run_cli(capsys, "train", str(cfg))
    assert code == 2 and "nowhere" in one_clear_line(err)
    code, _, err = run_cli(capsys, "doctor", str(tmp_path / "nowhere"))
    assert code == 1 and "does not exist" in err + _


def test_verify_refuses_a_dataset_without_scenes(tmp_path, capsys):
    """A folder where every scene failed to prepare has a manifest listing none: not OK."""
    root = tmp_path / "empty"
    root.mkdir()
    shards.write_manifest(root, "scannet20")
    assert any("lists no scenes" in p for p in shards.verify(root))
    code, out, _ = run_cli(capsys, "inspect", str(root), "--verify")
    assert code == 1 and "lists no scenes" in out and "OK" not in out


def test_doctor_checks_a_dataset_in_one_pass(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds")
    code, out, _ = run_cli(capsys, "doctor", str(root))
    assert code == 0 and f"dataset {root.resolve()}: OK" in out
    flipped = root / "val" / "scene0002_00.parquet"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "doctor", str(root), str(tmp_path / "nothing-here"))
    assert code == 1
    assert "scene0002_00.parquet: checksum mismatch" in out
    assert "nothing-here does not exist" in out and "2 with problems" in out


def test_doctor_follows_a_run_to_its_dataset_and_pseudo_labels(tmp_path, capsys):
    """A run directory: its dataset and its pseudo_labels/ are checked in the same pass, every
    problem named by file (the folder below is written as `rayseg pseudo-label` leaves it)."""
    from rayseg import config as cfgmod
    from rayseg import pseudo
    from rayseg.data import pseudo_store

    root = make_dataset(tmp_path / "ds", n=4)
    run_dir = tmp_path / "runs" / "r1"
    ckpt = run_dir / "checkpoints" / "000000004-cmg_rpc-e0001" / "state.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"the teacher's bytes")
    cfg = cfgmod.replace(cfgmod.Config(), **{"data.root": str(root), "data.region_column": ""})
    (run_dir / "config.toml").write_text(cfgmod.dumps(cfg))
    out = run_dir / "pseudo_labels"
    identity = pseudo.labelling_identity(run_dir, ckpt, cfg, "train")
    entries = [e for e in shards.load_manifest(root)["scenes"] if e["split"] == "train"]
    for e in entries:
        pseudo_store.write_pseudo(pseudo_store.pseudo_path(out, "train", e["scene_id"]), e["scene_id"],
                                  np.zeros(e["num_points"], np.uint8), identity["source"])
    pseudo_store.write_meta(out, {**identity, "complete": True, "scenes": len(entries)})
    code, text, _ = run_cli(capsys, "doctor", str(run_dir))
    assert code == 0, text
    assert f"dataset {root.resolve()}: OK" in text and f"pseudo-labels {out.resolve()}: OK" in text

    first, second = (pseudo_store.pseudo_path(out, "train", e["scene_id"]) for e in entries[:2])
    pseudo_store.write_pseudo(first, entries[0]["scene_id"], np.zeros(7, np.uint8), identity["source"])  # wrong size
    second.unlink()  # a scene without labels
    ckpt.write_bytes(b"other bytes")  # the checkpoint changed under the labels
    code, text, _ = run_cli(capsys, "doctor", str(run_dir))
    assert code == 1
    assert f"{first}: 7 pseudo-labels for scene {entries[0]['scene_id']} with 300 points" in text
    assert f"pseudo-labels for scene {entries[1]['scene_id']} not found: {second}" in text
    assert f"checkpoint {ckpt} has changed since it made these labels" in text
    with pytest.raises(pseudo_store.PseudoLabelError, match=r"7 pseudo-labels for scene .* \(and 2 more"):
        pseudo.check_folder(out)  # what `segment` runs before training on the folder
