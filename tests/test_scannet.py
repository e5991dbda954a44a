"""ScanNet: PLY and .sens readers, and `rayseg prepare scannet` on a miniature raw ScanNet written
in the real formats from synthetic scenes whose truth is known (tests/fixtures_raw.py)."""

from __future__ import annotations

import contextlib
import io
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import pytest

from fixtures_raw import (SCANNET_DEPTH_WH, SCANNET_K_DEPTH, box_distance, floor_faces, scannet_nyu40, transform,
                          truth_scene, write_scannet_real_export, write_scannet_scene, write_scannet_splits,
                          z_rotation)
from rayseg import cli
from rayseg.data import scannet, shards
from rayseg.data.ply import PlyError, read_ply, write_ply
from rayseg.data.scene import IGNORE_LABEL
from rayseg.data.sens import SensError, decode_color, decode_depth, read_sens, write_sens

W, H = 48, 36          # truth view size (depth resolution of the fixture)
OUT_W, OUT_H = 24, 18  # prepared view size
SKIP = 2
ALIGN = z_rotation(30.0, (0.7, -1.2, 0.05))      # raw scan frame -> axis-aligned frame
ALIGN_VAL = z_rotation(-75.0, (2.0, 0.5, 0.0))


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_ply_round_trip_and_truncation(tmp_path, binary):
    rng = np.random.default_rng(0)
    vertex = {"x": rng.random(7).astype(np.float32), "y": rng.random(7).astype(np.float32),
              "z": rng.random(7).astype(np.float32), "red": rng.integers(0, 256, 7).astype(np.uint8),
              "label": rng.integers(0, 41, 7).astype(np.uint16)}
    faces = np.array([[0, 1, 2], [2, 3, 4], [4, 5, 6]])
    path = write_ply(tmp_path / "m.ply", vertex, faces, binary=binary)
    back = read_ply(path)
    for key, value in vertex.items():
        assert back["vertex"][key].dtype == value.dtype
        np.testing.assert_array_equal(back["vertex"][key], value)
    np.testing.assert_array_equal(back["face"]["vertex_indices"], faces)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(PlyError, match="m.ply.*truncated"):
        read_ply(path)


def test_sens_round_trip_skips_frames_and_names_truncation(tmp_path):
    rng = np.random.default_rng(0)
    colors = [rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for _ in range(5)]
    depths = [rng.integers(0, 6000, (6, 8), dtype=np.uint16) for _ in range(5)]
    poses = np.tile(np.eye(4), (5, 1, 1))
    poses[3] = -np.inf
    K = np.array([[10.0, 0, 3.5], [0, 10.0, 2.5], [0, 0, 1]])
    path = write_sens(tmp_path / "s.sens", colors, depths, poses, 2 * K, K, color_compression="png")
    header, frames = read_sens(path, [1, 3])
    assert (header.color_width, header.color_height, header.depth_width, header.depth_height) == (16, 12, 8, 6)
    assert header.depth_shift == 1000.0 and header.num_frames == 5
    np.testing.assert_allclose(header.intrinsic_depth[:3, :3], K)
    assert [f.index for f in frames] == [1, 3]
    np.testing.assert_array_equal(decode_depth(header, frames[0]), depths[1])
    np.testing.assert_array_equal(decode_color(header, frames[0]), colors[1])  # PNG: lossless
    assert np.isneginf(frames[1].camera_to_world).all()
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(SensError, match=r"s\.sens: frame 4 .*truncated"):
        read_sens(path)


def test_vertex_normals_are_area_weighted():
    # Two triangles meeting at vertex 0: a big one in the xy plane (normal +z) and a small one in
    # the xz plane (normal +y: (0,0,1) x (1,0,0)); vertex 0's normal leans towards the big one's.
    v = np.array([[0, 0, 0], [4, 0, 0], [0, 4, 0], [0, 0, 1], [1, 0, 0]], np.float32)
    n = scannet.vertex_normals(v, np.array([[0, 1, 2], [0, 3, 4]]))
    expect = np.array([0.0, 1.0, 16.0]) / np.hypot(1.0, 16.0)  # cross lengths 16 and 1
    np.testing.assert_allclose(n[0], expect, atol=1e-6)
    np.testing.assert_allclose(n[1], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(n[3], [0, 1, 0], atol=1e-6)


def test_nyu40_mapping():
    ids = np.array([1, 2, 13, 14, 39, 40, 0, 36])
    assert scannet.nyu40_to_scannet20(ids).tolist() == [0, 1, 255, 12, 19, 255, 255, 18]


def test_instances_from_aggregation_and_segments(tmp_path):
    import json

    (tmp_path / "s_vh_clean_2.0.010000.segs.json").write_text(json.dumps({"segIndices": [5, 5, 9, 7, 9, 3]}))
    (tmp_path / "s.aggregation.json").write_text(json.dumps({"segGroups": [
        {"id": 0, "objectId": 0, "segments": [5], "label": "chair"},
        {"id": 1, "objectId": 1, "segments": [9, 3], "label": "table"}]}))
    assert scannet.read_instances(tmp_path, "s", 6).tolist() == [0, 0, 1, -1, 1, 1]
    with pytest.raises(ValueError, match="6 segIndices for 4 mesh vertices"):
        scannet.read_instances(tmp_path, "s", 4)
    assert scannet.read_instances(tmp_path, "other", 3).tolist() == [-1, -1, -1]


def test_axis_alignment_file(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("colorHeight = 968\naxisAlignment = " + " ".join(map(str, range(16))) + "\n")
    np.testing.assert_array_equal(scannet.read_axis_alignment(p), np.arange(16).reshape(4, 4))
    p.write_text("axisAlignment = 1 2 3\n")
    with pytest.raises(ValueError, match="s.txt.*3 numbers"):
        scannet.read_axis_alignment(p)
    assert scannet.read_axis_alignment(tmp_path / "missing.txt") is None


# --------------------------------------------------------------------------------------------
# prepare scannet
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_scannet(tmp_path_factory):
    """Four scenes: train (.sens, one -inf pose), val (exported frames), test (no labels), and a
    train scene with a truncated .sens."""
    root = tmp_path_factory.mktemp("scannet")
    raw = root / "scans"
    rng = np.random.default_rng(0)
    truths, expected, kept = {}, {}, {}
    plan = [("scene0000_00", "train", ALIGN, False, 1), ("scene0001_00", "val", ALIGN_VAL, True, None),
            ("scene0002_00", "test", ALIGN, False, None), ("scene0003_00", "train", ALIGN, False, None)]
    for index, (sid, split, align, exported, bad_view) in enumerate(plan):
        truth = truth_scene("scannet20", index, sid, split, width=W, height=H)
        nyu40, exp = scannet_nyu40(truth, rng)
        info = write_scannet_scene(raw, sid, truth, align, nyu40=None if split == "test" else nyu40,
                                   frame_skip=SKIP, bad_view=bad_view, exported=exported)
        truths[sid], expected[sid], kept[sid] = truth, exp, info["views"]
    sens = raw / "scene0003_00" / "scene0003_00.sens"
    sens.write_bytes(sens.read_bytes()[: sens.stat().st_size // 2])
    write_scannet_splits(root / "splits", {"train": ["scene0000_00", "scene0003_00"],
                                           "val": ["scene0001_00"], "test": ["scene0002_00"]})
    return {"root": root, "raw": raw, "splits": root / "splits", "truth": truths,
            "labels": expected, "views": kept}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def prepared(raw_scannet, ray_local):
    out = raw_scannet["root"] / "out"
    argv = ["prepare", "scannet", "--raw", str(raw_scannet["raw"]), "--splits", str(raw_scannet["splits"]),
            "--out", str(out), "--frame-skip", str(SKIP), "--image-size", f"{OUT_W}x{OUT_H}"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(argv)
    return {"out": out, "code": code, "stdout": stdout.getvalue()}


def _read(out, split, sid):
    return shards.read_scene(shards.scene_path(out, split, sid))


def test_corrupt_scene_is_named_and_exit_code_nonzero(prepared, capsys):
    assert prepared["code"] == 1
    # Frame bookkeeping over the three good scenes: 4 truth views each, one -inf pose.
    assert "frames: 12 considered (frame skip 2), 1 dropped" in prepared["stdout"]
    assert "FAILED scene0003_00" in prepared["stdout"]
    manifest = shards.load_manifest(prepared["out"])
    assert sorted(e["scene_id"] for e in manifest["scenes"]) == ["scene0000_00", "scene0001_00", "scene0002_00"]
    assert manifest["metadata"]["coordinates"] == "axis_aligned"


def test_points_labels_tags_against_truth(raw_scannet, prepared):
    truth = raw_scannet["truth"]["scene0000_00"]
    scene = _read(prepared["out"], "train", "scene0000_00")
    np.testing.assert_allclose(scene["coord"], truth["coord"], atol=2e-4)  # raw -> aligned undone
    np.testing.assert_array_equal(scene["color"], truth["color"])
    np.testing.assert_array_equal(scene["label"], raw_scannet["labels"]["scene0000_00"])
    assert (scene["label"] == IGNORE_LABEL).sum() > (truth["label"] == IGNORE_LABEL).sum()
    present = np.unique(raw_scannet["labels"]["scene0000_00"])
    assert np.nonzero(scene["tags"])[0].tolist() == present[present != IGNORE_LABEL].tolist()
    assert (scene["instance"] == -1).all()  # no aggregation files in the fixture
    np.testing.assert_allclose(scene["axis_alignment"], ALIGN, atol=1e-6)
    # Normals: area-weighted from the floor faces, recomputed here face by face in the aligned
    # frame; they point up; vertices without faces get zeros.
    floor = truth["label"] == 1
    faces = floor_faces(truth["coord"], truth["label"], 1)
    expect = np.zeros((len(truth["coord"]), 3))
    p = truth["coord"].astype(np.float64)
    for a, b, c in faces:
        n = np.cross(p[b] - p[a], p[c] - p[a])
        expect[a] += n
        expect[b] += n
        expect[c] += n
    expect[floor] /= np.linalg.norm(expect[floor], axis=1, keepdims=True)
    np.testing.assert_allclose(scene["normal"][floor], expect[floor], atol=1e-3)
    assert np.median(scene["normal"][floor][:, 2]) > 0.99
    assert not scene["normal"][~floor].any()


def test_views_frames_intrinsics_poses_against_truth(raw_scannet, prepared):
    truth = raw_scannet["truth"]["scene0000_00"]
    keep = raw_scannet["views"]["scene0000_00"]
    scene = _read(prepared["out"], "train", "scene0000_00")
    assert scene["frames_total"].item() == len(truth["view_rgb"]) and scene["frames_dropped"].item() == 1
    assert scene["view_frame"].tolist() == [SKIP * i for i in keep]
    assert scene["view_rgb"].shape == (len(keep), OUT_H, OUT_W, 3)
    np.testing.assert_allclose(scene["view_pose"], truth["view_pose"][keep], atol=1e-4)
    s = OUT_W / W
    K = truth["view_intrinsics"][0]
    expect_K = [[K[0, 0] * s, 0, (K[0, 2] + 0.5) * s - 0.5], [0, K[1, 1] * s, (K[1, 2] + 0.5) * s - 0.5], [0, 0, 1]]
    np.testing.assert_allclose(scene["view_intrinsics"], np.tile(expect_K, (len(keep), 1, 1)), atol=1e-4)
    # Nearest-neighbour depth: output pixel i samples input pixel 2i + 1 (factor 2).
    np.testing.assert_allclose(scene["view_depth"], truth["view_depth"][keep][:, 1::2, 1::2], atol=1.5e-3)
    # Colour: the 2x-upsampled colour stream, resized 4x down, matches the truth at half size.
    half = truth["view_rgb"][keep].reshape(len(keep), OUT_H, 2, OUT_W, 2, 3).mean(axis=(2, 4))
    assert np.abs(scene["view_rgb"].astype(float) - half).mean() < 10


def test_exported_frames_and_test_split(raw_scannet, prepared):
    val = _read(prepared["out"], "val", "scene0001_00")
    truth = raw_scannet["truth"]["scene0001_00"]
    assert val["view_frame"].tolist() == [SKIP * i for i in range(len(truth["view_rgb"]))]
    np.testing.assert_allclose(val["coord"], truth["coord"], atol=2e-4)
    np.testing.assert_allclose(val["view_pose"], truth["view_pose"], atol=1e-4)
    np.testing.assert_allclose(val["view_depth"], truth["view_depth"][:, 1::2, 1::2], atol=1.5e-3)
    np.testing.assert_allclose(val["view_intrinsics"][0, 0, 0], truth["view_intrinsics"][0, 0, 0] / 2, rtol=1e-4)
    test = _read(prepared["out"], "test", "scene0002_00")
    assert (test["label"] == IGNORE_LABEL).all() and not test["tags"].any() and test["tags_known"].item() == 0


def test_second_run_skips_complete_scenes(raw_scannet, prepared):
    opts = scannet.ScanNetOptions(frame_skip=SKIP, image_width=OUT_W, image_height=OUT_H)
    summary = scannet.prepare_scannet([raw_scannet["raw"]], raw_scannet["splits"], prepared["out"], opts)
    assert sorted(summary.skipped) == ["scene0000_00", "scene0001_00", "scene0002_00"]
    assert list(summary.failed) == ["scene0003_00"]
    assert "scene0003_00.sens" in summary.failed["scene0003_00"] and "truncated" in summary.failed["scene0003_00"]


def test_raw_coordinates_keep_scan_frame(raw_scannet):
    truth = raw_scannet["truth"]["scene0000_00"]
    opts = scannet.ScanNetOptions(frame_skip=SKIP, image_width=OUT_W, image_height=OUT_H, axis_align=False)
    scene = scannet.load_scene(raw_scannet["raw"] / "scene0000_00", "scene0000_00", "train", opts)
    to_raw = np.linalg.inv(ALIGN)
    np.testing.assert_allclose(scene["coord"], transform(to_raw, truth["coord"]), atol=2e-4)
    keep = raw_scannet["views"]["scene0000_00"]
    np.testing.assert_allclose(scene["view_pose"], to_raw @ truth["view_pose"][keep], atol=1e-4)
    assert scene["axis_aligned"].item() == 0
    np.testing.assert_allclose(scene["axis_alignment"], ALIGN, atol=1e-6)


def test_bad_paths_fail_before_ray_naming_the_path(tmp_path, capsys):
    code = cli.main(["prepare", "scannet", "--raw", str(tmp_path / "nope"), "--splits", str(tmp_path),
                     "--out", str(tmp_path / "out")])
    assert code == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_other_frame_skip_or_image_size_into_a_prepared_folder_is_refused(raw_scannet, prepared, capsys):
    """Topping up a complete folder with other settings would keep its scenes and write a manifest
    claiming settings they were not made with."""
    before = (prepared["out"] / "manifest.json").read_bytes()
    base = ["prepare", "scannet", "--raw", str(raw_scannet["raw"]), "--splits", str(raw_scannet["splits"]),
            "--out", str(prepared["out"])]
    assert cli.main(base + ["--frame-skip", str(SKIP + 1), "--image-size", f"{OUT_W}x{OUT_H}"]) == 2
    assert f"frame_skip: {SKIP} there, {SKIP + 1} now" in capsys.readouterr().err
    assert cli.main(base + ["--frame-skip", str(SKIP), "--image-size", f"{2 * OUT_W}x{2 * OUT_H}"]) == 2
    assert f"image_size: [{OUT_W}, {OUT_H}] there, [{2 * OUT_W}, {2 * OUT_H}] now" in capsys.readouterr().err
    assert (prepared["out"] / "manifest.json").read_bytes() == before
    settings = shards.load_manifest(prepared["out"])["metadata"]["settings"]
    assert settings["frame_skip"] == SKIP and settings["image_size"] == [OUT_W, OUT_H]


# --------------------------------------------------------------------------------------------
# The exported-frames layout as ScanNet's reader writes it (640x480 depth, off-centre principal point)
# --------------------------------------------------------------------------------------------


def _backprojection_error(scene: dict) -> np.ndarray:
    """|distance to the room's faces| of every depth pixel back-projected with the record's K and pose."""
    out = []
    for depth, K, pose in zip(scene["view_depth"], scene["view_intrinsics"].astype(float),
                              scene["view_pose"].astype(float)):
        v, u = np.nonzero(depth > 0)
        z = depth[v, u]
        cam = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], axis=1)
        out.append(np.abs(box_distance(cam @ pose[:3, :3].T + pose[:3, 3])))
    return np.concatenate(out)


def test_real_export_layout_reads_intrinsics_for_the_depth_images_size(tmp_path):
    info = write_scannet_real_export(tmp_path, "scene0000_00")
    # The principal point is off-centre: guessing the size from it gives 639x486, not 640x480.
    assert round(2 * (SCANNET_K_DEPTH[0, 2] + 0.5)) == 639 and round(2 * (SCANNET_K_DEPTH[1, 2] + 0.5)) == 486
    for wh in ((640, 480), (320, 240)):
        opts = scannet.ScanNetOptions(frame_skip=1, image_width=wh[0], image_height=wh[1])
        scene = scannet.load_scene(tmp_path / "scene0000_00", "scene0000_00", "train", opts)
        expect = scannet.scale_intrinsics(SCANNET_K_DEPTH, SCANNET_DEPTH_WH, wh)
        np.testing.assert_allclose(scene["view_intrinsics"], np.tile(expect, (3, 1, 1)), rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(scene["view_pose"], info["poses"], atol=1e-5)
        assert scene["view_rgb"].shape == (3, wh[1], wh[0], 3)
    # At the native size no pixel is resampled: depth and K agree to the millimetre rounding.
    # (The principal-point guess put points up to ~1 cm off the walls here, 3.4 px on a real scene.)
    opts = scannet.ScanNetOptions(frame_skip=1, image_width=640, image_height=480)
    err = _backprojection_error(scannet.load_scene(tmp_path / "scene0000_00", "scene0000_00", "train", opts))
    assert np.percentile(err, 99) < 1e-3, np.percentile(err, 99)


def test_real_export_with_resized_depth_is_refused_by_name(tmp_path):
    write_scannet_real_export(tmp_path, "scene0000_00", num_frames=1, depth_wh=(320, 240))
    opts = scannet.ScanNetOptions(frame_skip=1)
    with pytest.raises(ValueError, match=r"intrinsic_depth.txt with .*depth/0.png: principal point "
                                         r"\(318.9, 242.7\) is not near the centre of the 320x240"):
        scannet.load_scene(tmp_path / "scene0000_00", "scene0000_00", "train", opts)


def test_raw_pointing_at_the_wrong_folder_gets_a_hint(tmp_path, capsys):
    root = tmp_path / "ScanNet"
    write_scannet_real_export(root / "scans", "scene0000_00", num_frames=1)
    (root / "scans_test").mkdir()
    write_scannet_splits(tmp_path / "splits", {"train": ["scene0000_00"]})
    args = ["--splits", str(tmp_path / "splits"), "--out", str(tmp_path / "out")]
    assert cli.main(["prepare", "scannet", "--raw", str(root)] + args) == 2
    err = capsys.readouterr().err
    assert f"pass --raw {root / 'scans'} {root / 'scans_test'}" in err
    assert cli.main(["prepare", "scannet", "--raw", str(root / "scans" / "scene0000_00")] + args) == 2
    assert f"is one scene's folder (or one scene's exported frames): pass the folder that holds the scene " \
           f"folders, e.g. --raw {root / 'scans'}" in capsys.readouterr().err
    # Frames exported to a folder of their own, away from the scans: the scene is found but has no mesh.
    export = tmp_path / "exported" / "scene0000_00"
    export.parent.mkdir()
    (root / "scans" / "scene0000_00").rename(export)
    export.joinpath("scene0000_00_vh_clean_2.ply").unlink()
    with pytest.raises(FileNotFoundError, match="holds exported frames but not the scan"):
        scannet.load_scene(export, "scene0000_00", "train", scannet.ScanNetOptions())
