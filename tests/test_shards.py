"""Parquet shards: round trip, atomic writes, corruption detection, bad input.
Reading shards through Ray Data is tested in test_prepare.py (one local Ray for the data layer)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayseg.data import shards
from rayseg.data.scene import IGNORE_LABEL, SceneError

NUM_CLASSES = 20


def make_scene(scene_id: str = "scene0000_00", split: str = "train", n: int = 500, views: int = 2,
               h: int = 24, w: int = 32, seed: int = 0) -> dict:
    """A small scene with every key of the contract, a partition and an extra dataset array."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    # Smooth images: JPEG reproduces them closely (noise images would not be a fair tolerance test).
    rgb = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 40 + 30 * seed % 200)], -1)
    depth = (1.0 + 0.01 * xx + 0.02 * yy).astype(np.float32)
    depth[0, 0] = 0.0  # invalid stays invalid
    label = rng.integers(0, NUM_CLASSES, n).astype(np.uint8)
    label[:5] = IGNORE_LABEL
    tags = np.zeros(NUM_CLASSES, np.uint8)
    tags[np.unique(label[label != IGNORE_LABEL])] = 1
    pose = np.tile(np.eye(4, dtype=np.float32), (views, 1, 1))
    pose[:, :3, 3] = rng.normal(size=(views, 3))
    return {
        "scene_id": scene_id, "split": split,
        "coord": rng.normal(size=(n, 3)).astype(np.float32),
        "color": rng.integers(0, 256, (n, 3), dtype=np.uint8),
        "normal": rng.normal(size=(n, 3)).astype(np.float32),
        "label": label,
        "instance": rng.integers(-1, 40, n).astype(np.int32),
        "tags": tags,
        "view_rgb": np.repeat(rgb[None].astype(np.uint8), views, 0),
        "view_depth": np.repeat(depth[None], views, 0),
        "view_pose": pose,
        "view_intrinsics": np.tile(np.array([[30, 0, w / 2], [0, 30, h / 2], [0, 0, 1]], np.float32), (views, 1, 1)),
        "view_frame": np.arange(views, dtype=np.int32) * 20,
        "view_label": rng.integers(0, NUM_CLASSES, (views, h, w)).astype(np.uint8),
        "region_pointwise": np.arange(n, dtype=np.int32),
        "view_region_pointwise": rng.integers(-1, 10**6, (views, h, w)).astype(np.int32),
        "axis_alignment": rng.normal(size=(4, 4)),  # an extra float64 array a dataset may add
    }


def assert_same_scene(expected: dict, got: dict) -> None:
    assert set(expected) == set(got)
    for key, want in expected.items():
        have = got[key]
        if isinstance(want, str):
            assert have == want, key
            continue
        assert have.dtype == want.dtype and have.shape == want.shape, key
        if key == "view_rgb":
            err = np.abs(have.astype(int) - want.astype(int))
            assert err.mean() < 1.5 and err.max() <= 24, (key, err.mean(), err.max())
        elif key == "view_depth":
            assert np.abs(have - want).max() <= 0.001, key  # 16-bit millimetres
            assert ((have == 0) == (want == 0)).all(), key  # invalid pixels stay invalid
        else:
            np.testing.assert_array_equal(have, want, err_msg=key)


def test_round_trip_every_key(tmp_path):
    scene = make_scene()
    path = shards.write_scene(tmp_path, scene)
    assert path == tmp_path / "train" / "scene0000_00.parquet"
    got = shards.read_scene(path)
    assert_same_scene(scene, got)
    # Exact for arrays: the extra float64 array keeps its dtype, contract arrays their contract dtype.
    assert got["axis_alignment"].dtype == np.float64 and got["coord"].dtype == np.float32
    # The same decoding from pyarrow's to_pylist rows.
    row = pq.read_table(path).to_pylist()[0]
    assert_same_scene(got, shards.row_to_scene(row))


def test_depth_encoding_clamps_to_invalid(tmp_path):
    scene = make_scene(views=1)
    scene["view_depth"][0, 1, :4] = [np.nan, np.inf, -1.0, 70.0]  # none fits uint16 millimetres
    got = shards.read_scene(shards.write_scene(tmp_path, scene))
    assert (got["view_depth"][0, 1, :4] == 0).all()
    assert got["view_depth"][0, 1, 4] == pytest.approx(scene["view_depth"][0, 1, 4], abs=5e-4)


def test_scene_without_views_and_dtype_conversion(tmp_path):
    scene = make_scene(views=1)
    for key in [k for k in scene if k.startswith("view_")]:
        del scene[key]
    scene["coord"] = scene["coord"].astype(np.float64)  # float64 -> float32 (the contract)
    scene["region_pointwise"] = scene["region_pointwise"].astype(np.int64)  # fits int32: accepted
    got = shards.read_scene(shards.write_scene(tmp_path, scene))
    assert got["coord"].dtype == np.float32 and got["region_pointwise"].dtype == np.int32
    assert not any(k.startswith("view_") for k in got)

    bad = dict(scene, region_pointwise=np.full(len(scene["coord"]), 2**40, np.int64))
    with pytest.raises(SceneError, match="scene0000_00: region_pointwise: values do not fit int32"):
        shards.write_scene(tmp_path, bad)


def test_columns_restrict_decoding_and_gt_is_excluded(tmp_path):
    path = shards.write_scene(tmp_path, make_scene())
    columns = shards.without_gt(shards.shard_columns(path))
    assert not set(shards.GT_COLUMNS) & set(columns)
    got = shards.read_scene(path, columns=columns)
    assert not set(shards.GT_COLUMNS) & set(got)
    assert {"coord", "tags", "view_rgb", "region_pointwise"} <= set(got)
    only = shards.read_scene(path, columns=["coord"])
    assert set(only) == {"scene_id", "split", "coord"}
    # A row read with only some columns (no bookkeeping columns) decodes the same way.
    row = pq.read_table(path, columns=columns).to_pylist()[0]
    assert_same_scene(got, shards.row_to_scene(row))
    with pytest.raises(shards.ShardError, match=r"train/scene0000_00.parquet.*region_vccs"):
        shards.read_scene(path, columns=["region_vccs"])
    row = pq.read_table(path).to_pylist()[0]
    with pytest.raises(shards.ShardError, match="scene scene0000_00.*region_vccs"):
        shards.row_to_scene(row, columns=["region_vccs"])


def test_exception_inside_write_leaves_old_file(tmp_path):
    old = make_scene()
    path = shards.write_scene(tmp_path, old)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with shards.atomic_path(path) as tmp:
            tmp.write_bytes(before[: len(before) // 2])  # a partial file exists under the temp name
            raise RuntimeError("disk full")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # temp removed


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from rayseg.data import shards
    root, n = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(1)
    scene = {"scene_id": "big", "split": "train", "coord": rng.normal(size=(n, 3)).astype(np.float32),
             "color": rng.integers(0, 256, (n, 3), dtype=np.uint8), "tags": np.ones(20, np.uint8),
             "normal": rng.normal(size=(n, 3)).astype(np.float32)}
    print("encoding", flush=True)
    shards.write_scene(root, scene)
    print("done", flush=True)
""")


def test_killed_writer_leaves_no_half_shard(tmp_path):
    rng = np.random.default_rng(0)
    old = {"scene_id": "big", "split": "train", "coord": rng.normal(size=(10, 3)).astype(np.float32),
           "color": np.zeros((10, 3), np.uint8), "tags": np.ones(20, np.uint8)}
    path = shards.write_scene(tmp_path, old)
    before = path.read_bytes()
    killed_mid_write = False
    for attempt in range(3):  # the kill must land while the temp file is being written
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "3000000"],
                                stdout=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if any(t.stat().st_size > 0 for t in path.parent.glob(".*.tmp")):
                proc.kill()
                break
            time.sleep(0.0005)
        proc.wait()
        temps = list(path.parent.glob(".*.tmp"))
        if proc.returncode == -9 and temps:
            killed_mid_write = True
            break
        for t in temps:
            t.unlink()
        shards.write_scene(tmp_path, old)  # the writer finished first: restore and retry
    assert killed_mid_write, "could not kill the writer while it was writing"
    assert temps[0].stat().st_size > 0  # a half-written temp file exists ...
    assert path.read_bytes() == before  # ... but the scene's name still holds the old shard
    assert shards.read_scene(path)["coord"].shape == (10, 3)
    shards.write_manifest(tmp_path, "scannet20")
    assert [p.name for p in shards.scene_paths(tmp_path)] == ["big.parquet"]  # temp not listed
    problems = shards.verify(tmp_path)
    assert len(problems) == 1 and "leftover temp file" in problems[0] and temps[0].name in problems[0]


def test_verify_names_truncated_flipped_missing_and_extra_files(tmp_path):
    for i in range(4):
        shards.write_scene(tmp_path, make_scene(f"s{i}", seed=i))
    manifest = shards.write_manifest(tmp_path, "scannet20", {"coordinates": "axis_aligned"})
    assert manifest["splits"] == {"train": 4} and manifest["metadata"] == {"coordinates": "axis_aligned"}
    assert manifest["class_names"][0] == "wall" and len(manifest["scenes"][0]["sha256"]) == 64
    assert shards.verify(tmp_path) == []

    truncated = tmp_path / "train" / "s0.parquet"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    flipped = tmp_path / "train" / "s1.parquet"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum (and the page CRC) can tell
    flipped.write_bytes(bytes(data))
    (tmp_path / "train" / "s2.parquet").unlink()
    shards.write_scene(tmp_path, make_scene("s9", split="val"))  # on disk, not in the manifest

    problems = shards.verify(tmp_path)
    text = "\n".join(problems)
    assert any(p.startswith("train/s0.parquet: size") for p in problems), text
    assert any(p.startswith("train/s0.parquet: unreadable or truncated parquet") for p in problems), text
    assert "train/s1.parquet: checksum mismatch" in text
    assert "train/s2.parquet: missing" in text
    assert "val/s9.parquet: extra file not in the manifest" in text
    assert not any(p.startswith("train/s3.parquet") for p in problems), text
    # The flipped shard is also caught without the manifest (Parquet page checksums).
    assert shards.verify_shard(flipped, NUM_CLASSES)


def test_update_scene_adds_columns_without_touching_others(tmp_path):
    scene = make_scene()
    path = shards.write_scene(tmp_path, scene)
    shards.write_manifest(tmp_path, "scannet20")
    jpeg_before = pq.read_table(path, columns=["view_rgb"]).to_pylist()[0]["view_rgb"]
    n, (v, h, w) = len(scene["coord"]), scene["view_label"].shape
    regions = (np.arange(n) // 7).astype(np.int64)  # int64 from a partition algorithm: fits int32
    view_regions = np.full((v, h, w), -1, np.int32)
    view_regions[:, 4:, :] = 3
    shards.update_scene(path, {"region_vccs": regions, "view_region_vccs": view_regions})

    got = shards.read_scene(path)
    np.testing.assert_array_equal(got["region_vccs"], regions.astype(np.int32))
    np.testing.assert_array_equal(got["view_region_vccs"], view_regions)
    assert pq.read_table(path, columns=["view_rgb"]).to_pylist()[0]["view_rgb"] == jpeg_before
    assert_same_scene(scene, {k: got[k] for k in scene})

    assert any("checksum mismatch" in p or "size" in p for p in shards.verify(tmp_path))
    entry = shards.refresh_manifest_entry(tmp_path, path)
    assert entry["regions"] == ["pointwise", "vccs"]
    assert shards.verify(tmp_path) == []

    with pytest.raises(SceneError, match=r"scene0000_00: region_bad: expected shape \(500,\)"):
        shards.update_scene(path, {"region_bad": np.zeros(3, np.int32)})
    with pytest.raises(SceneError, match="view_region_bad: expected shape"):
        shards.update_scene(path, {"view_region_bad": np.zeros((v, h + 1, w), np.int32)})


def test_bad_input_names_the_path_or_scene(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"dataset folder {missing} does not exist"):
        shards.scene_paths(missing)
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        shards.scene_paths(tmp_path)
    shards.write_manifest(tmp_path, "scannet20")  # an empty shard folder
    with pytest.raises(shards.ShardError, match=f"{tmp_path}: dataset has no scenes"):
        shards.scene_paths(tmp_path)
    shards.write_scene(tmp_path, make_scene())
    shards.write_manifest(tmp_path, "scannet20")
    with pytest.raises(shards.ShardError, match=f"{tmp_path}: no scenes in split 'val'"):
        shards.scene_paths(tmp_path, "val")

    empty = make_scene("empty", n=0)
    with pytest.raises(SceneError, match="scene empty: coord: scene has zero points"):
        shards.write_scene(tmp_path, empty)
    with pytest.raises(SceneError, match="scene_id: must be a plain file name"):
        shards.write_scene(tmp_path, make_scene("../escape"))
    with pytest.raises(shards.ShardError, match="dataset profile must be one of"):
        shards.write_manifest(tmp_path, "nyu40")

    not_parquet = tmp_path / "train" / "junk.parquet"
    not_parquet.write_text("not a parquet file")
    with pytest.raises(shards.ShardError, match=f"shard {not_parquet}: unreadable parquet"):
        shards.read_scene(not_parquet)
    with pytest.raises(FileNotFoundError, match="shard .*ghost.parquet does not exist"):
        shards.read_scene(tmp_path / "train" / "ghost.parquet")


def test_views_are_per_view_values_so_readers_can_decode_a_subset(tmp_path):
    scene = make_scene(views=3)
    path = shards.write_scene(tmp_path, scene)
    row = pq.read_table(path).to_pylist()[0]
    per_view = [k for k in row if shards.per_view(k)]
    assert sorted(per_view) == ["view_depth", "view_label", "view_region_pointwise", "view_rgb"]
    chosen = [2, 0]
    subset = {k: ([v[i] for i in chosen] if shards.per_view(k) else v) for k, v in row.items()}
    got = shards.row_to_scene(subset)
    np.testing.assert_array_equal(got["view_region_pointwise"], scene["view_region_pointwise"][chosen])
    np.testing.assert_array_equal(got["view_label"], scene["view_label"][chosen])
    assert got["view_rgb"].shape == (2, 24, 32, 3)
