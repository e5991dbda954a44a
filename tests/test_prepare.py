"""The Ray side of the data layer: `rayseg prepare` (one Ray task per scene, resumable,
per-scene failures), reading shards through Ray Data, and `rayseg inspect`."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")

import numpy as np
import pytest

from rayseg import cli
from rayseg.data import shards
from rayseg.data.prepare import SceneTask, run_prepare

NUM_CLASSES = 20


def tiny_scene(scene_id: str, split: str = "train", n: int = 300, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 4, n).astype(np.uint8)  # classes 0..3 only: a known histogram
    tags = np.zeros(NUM_CLASSES, np.uint8)
    tags[np.unique(label)] = 1
    v, h, w = 2, 12, 16
    return {
        "scene_id": scene_id, "split": split,
        "coord": rng.normal(size=(n, 3)).astype(np.float32),
        "color": rng.integers(0, 256, (n, 3), dtype=np.uint8),
        "normal": np.zeros((n, 3), np.float32), "label": label,
        "instance": np.full(n, -1, np.int32), "tags": tags,
        "view_rgb": rng.integers(0, 256, (v, h, w, 3), dtype=np.uint8),
        "view_depth": rng.uniform(0.5, 4, (v, h, w)).astype(np.float32),
        "view_pose": np.tile(np.eye(4, dtype=np.float32), (v, 1, 1)),
        "view_intrinsics": np.tile(np.eye(3, dtype=np.float32), (v, 1, 1)),
        "view_frame": np.arange(v, dtype=np.int32),
        "view_label": np.zeros((v, h, w), np.uint8),
        "region_pointwise": np.arange(n, dtype=np.int32),
        "view_region_pointwise": rng.integers(-1, 50, (v, h, w)).astype(np.int32),
    }


def task(scene: dict) -> SceneTask:
    # functools.partial(dict, **scene) is a picklable builder that returns the scene record.
    return SceneTask(scene["scene_id"], scene["split"], functools.partial(dict, **scene))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_ray_data_rows_decode_like_read_scene(tmp_path, ray_local):
    import ray.data

    ray.data.DataContext.get_current().target_max_block_size = 16 * 2**20
    for i, split in enumerate(["train", "train", "val"]):
        shards.write_scene(tmp_path, tiny_scene(f"s{i}", split, n=300 + 50 * i, seed=i))
    shards.write_manifest(tmp_path, "scannet20")
    paths = [str(p) for p in shards.scene_paths(tmp_path)]

    rows = ray.data.read_parquet(paths).map(shards.row_to_scene).take_all()
    assert sorted(r["scene_id"] for r in rows) == ["s0", "s1", "s2"]
    for row in rows:
        expected = shards.read_scene(shards.scene_path(tmp_path, row["split"], row["scene_id"]))
        assert set(row) == set(expected) and "label" in row and "view_rgb" in row
        for key, want in expected.items():
            if isinstance(want, str):
                assert row[key] == want
            else:  # the same bytes decoded the same way: exact, JPEG included
                assert row[key].dtype == want.dtype and row[key].shape == want.shape, key
                np.testing.assert_array_equal(row[key], want, err_msg=key)


def test_prepare_resumes_skips_complete_and_redoes_corrupt(tmp_path, ray_local, capsys):
    good = [tiny_scene(f"room{i}", "val" if i == 3 else "train", seed=i) for i in range(4)]
    tasks = [task(s) for s in good]
    tasks.append(task(tiny_scene("empty_room", n=0)))  # zero points: fails validation
    tasks.append(SceneTask("broken_room", "train",  # the builder itself raises
                           functools.partial(np.load, str(tmp_path / "raw" / "missing.npy"))))

    summary = run_prepare(tmp_path / "out", tasks, "scannet20", {"coordinates": "axis_aligned"},
                          num_cpus_per_task=0.5)
    root = tmp_path / "out"
    assert sorted(summary.written) == ["room0", "room1", "room2", "room3"] and not summary.skipped
    assert set(summary.failed) == {"empty_room", "broken_room"} and not summary.ok
    assert "empty_room: coord: scene has zero points" in summary.failed["empty_room"]
    assert "FileNotFoundError" in summary.failed["broken_room"] and "missing.npy" in summary.failed["broken_room"]
    out = capsys.readouterr()
    assert "prepare: 6/6 scenes (4 written, 0 skipped, 2 failed)" in out.out
    assert "scene broken_room FAILED" in out.err
    assert "FAILED empty_room" in summary.format()

    manifest = shards.load_manifest(root)
    assert manifest["splits"] == {"train": 3, "val": 1}
    assert manifest["metadata"] == {"coordinates": "axis_aligned"}
    assert shards.verify(root) == []
    for s in good:
        got = shards.read_scene(shards.scene_path(root, s["split"], s["scene_id"]))
        np.testing.assert_array_equal(got["coord"], s["coord"])

    # Second run: the four complete scenes are skipped, the failures are retried (and fail again).
    summary = run_prepare(root, tasks, "scannet20", num_cpus_per_task=0.5)
    assert sorted(summary.skipped) == ["room0", "room1", "room2", "room3"] and not summary.written
    assert set(summary.failed) == {"empty_room", "broken_room"}

    # A corrupted shard (a flipped byte) is redone; the others are still skipped.
    corrupt = shards.scene_path(root, "train", "room1")
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 3] ^= 0x55
    corrupt.write_bytes(bytes(data))
    assert any("room1.parquet: checksum mismatch" in p for p in shards.verify(root))
    summary = run_prepare(root, tasks[:4], "scannet20", num_cpus_per_task=0.5)
    assert summary.written == ["room1"] and sorted(summary.skipped) == ["room0", "room2", "room3"]
    assert shards.verify(root) == []

    # A run killed before writing its manifest: shards that read back valid are kept, a truncated
    # one is redone.
    (root / "manifest.json").unlink()
    truncated = shards.scene_path(root, "train", "room2")
    truncated.write_bytes(truncated.read_bytes()[:500])
    summary = run_prepare(root, tasks[:4], "scannet20", num_cpus_per_task=0.5)
    assert summary.written == ["room2"] and sorted(summary.skipped) == ["room0", "room1", "room3"]
    assert shards.verify(root) == []


def test_prepare_rejects_bad_task_lists(tmp_path):
    a = task(tiny_scene("a"))
    with pytest.raises(ValueError, match="duplicate scene id 'a'"):
        run_prepare(tmp_path, [a, a], "scannet20")
    with pytest.raises(ValueError, match=f"nothing to prepare into {tmp_path}"):
        run_prepare(tmp_path, [], "scannet20")
    with pytest.raises(ValueError, match="profile must be one of"):
        run_prepare(tmp_path, [a], "nyu40")
    with pytest.raises(ValueError, match="scene_id: must be a plain file name"):
        run_prepare(tmp_path, [SceneTask("a/b", "train", a.make)], "scannet20")


def test_inspect_cli_summary_histogram_and_verify(tmp_path, ray_local, capsys):
    root = tmp_path / "ds"
    scenes = [tiny_scene(f"r{i}", seed=i) for i in range(2)]
    run_prepare(root, [task(s) for s in scenes], "scannet20", num_cpus_per_task=0.5)
    capsys.readouterr()

    assert cli.main(["inspect", str(root), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "scannet20 (20 classes)" in out and "train: 2" in out
    labels = np.concatenate([s["label"] for s in scenes])
    for c, name in enumerate(["wall", "floor", "cabinet", "bed"]):  # GT point counts per class
        assert any(line.split()[:3] == [str(c), name, f"{(labels == c).sum():,}"] for line in out.splitlines()), name
    assert "r0" in out and "r1" in out and "verify: OK" in out

    shard = shards.scene_path(root, "train", "r1")
    shard.write_bytes(shard.read_bytes()[:-64])
    assert cli.main(["inspect", str(root), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "train/r1.parquet: size" in out and "train/r0.parquet" not in out

    assert cli.main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert f"dataset folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["inspect", str(tmp_path / "empty")]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


def test_prepare_synthetic_cli_writes_generator_scenes_and_resumes(tmp_path, ray_local, capsys):
    from rayseg.config import SyntheticConfig
    from rayseg.data import synthetic

    out = tmp_path / "synth"
    argv = ["prepare", "synthetic", "--out", str(out), "--scenes", "3", "--views", "2", "--seed", "5",
            "--image-size", "40x30", "--set", "synthetic.min_points=1000",
            "--set", "synthetic.max_points=1500"]
    assert cli.main(argv) == 0
    assert "3 scenes: 3 written, 0 skipped" in capsys.readouterr().out
    manifest = shards.load_manifest(out)
    assert manifest["splits"] == {"train": 2, "val": 1}
    assert manifest["metadata"]["settings"]["seed"] == 5
    cfg = SyntheticConfig(num_scenes=3, num_views=2, seed=5, image_width=40, image_height=30,
                          min_points=1000, max_points=1500)
    expected = synthetic.generate_scene(cfg, 2)
    got = shards.read_scene(shards.scene_path(out, expected["split"], expected["scene_id"]))
    np.testing.assert_array_equal(got["coord"], expected["coord"])
    np.testing.assert_array_equal(got["view_label"], expected["view_label"])
    assert got["view_rgb"].shape == (2, 30, 40, 3)

    assert cli.main(argv) == 0  # resumable: nothing to redo
    assert "3 scenes: 0 written, 3 skipped" in capsys.readouterr().out
    # Other generator settings into the same folder: refused (not silently mixed), files untouched
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    assert cli.main(argv + ["--set", "synthetic.door_p=0.2"]) != 0
    err = capsys.readouterr().err
    assert "door_p: 0.7 there, 0.2 now" in err and "use another --out" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before
    assert cli.main(argv[:-4] + ["--image-size", "40by30"]) == 2
    assert "--image-size: expected WxH" in capsys.readouterr().err

    # Without --out the folder is the config's data.root: the same folder, so nothing to redo
    config = tmp_path / "exp.toml"
    config.write_text(f'[data]\nroot = "{out}"\n[synthetic]\nmin_points = 1000\nmax_points = 1500\n')
    assert cli.main(["prepare", "synthetic", str(config), "--scenes", "3", "--views", "2", "--seed", "5",
                     "--image-size", "40x30"]) == 0
    assert "3 scenes: 0 written, 3 skipped" in capsys.readouterr().out
    assert cli.main(["prepare", "synthetic", "--scenes", "3"]) == 2
    assert "give --out DIR, or a config whose data.root" in capsys.readouterr().err
    for reader in (["scannet", "--raw", "r", "--splits", "s"], ["s3dis", "--raw", "r"]):  # no config: --out needed
        with pytest.raises(SystemExit):
            cli.main(["prepare", *reader])
        assert "the following arguments are required: --out" in capsys.readouterr().err

    # A 13-class scene dropped into the folder: re-running prepare used to list it in the manifest.
    foreign = tiny_scene("Area_1_office_1")
    foreign["tags"] = foreign["tags"][:13]
    shards.write_scene(out, foreign)
    manifest_before = (out / shards.MANIFEST_NAME).read_text()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "train/Area_1_office_1.parquet: 13 class tags, but this is a scannet20 dataset" in err
    assert (out / shards.MANIFEST_NAME).read_text() == manifest_before
