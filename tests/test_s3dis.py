"""S3DIS + 2D-3D-S: `rayseg prepare s3dis` on miniature raw copies (S3DIS v1.2 with angle files,
and an Aligned_Version without them) and 2D-3D-S views, written from synthetic truth rooms."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import pytest

from fixtures_raw import (truth_scene, write_2d3ds_views, write_angle_file,
                          write_s3dis_room)
from rayseg import cli
from rayseg.data import s3dis, shards
from rayseg.data.scene import S3DIS13

N = 40      # truth views are N x N (2D-3D-S views are square)
OUT = 20    # prepared view size
# (area, room, 2D-3D-S area folder, alignment angle in degrees)
ROOMS = [("Area_1", "office_1", "area_1", 90), ("Area_5", "office_2", "area_5b", 270),
         ("Area_5", "hallway_1", "area_5a", 0)]


def expected_aligned(points: np.ndarray, angle: float, centre: np.ndarray) -> np.ndarray:
    """Rz(-angle) about the room's box centre, written out here independently of s3dis.py."""
    a = np.deg2rad(-angle)
    r = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return (points - centre) @ r.T + centre


def aligned_pose(pose: np.ndarray, angle: float, centre: np.ndarray) -> np.ndarray:
    out = np.array(pose, np.float64)
    out[..., :3, 3] = expected_aligned(out[..., :3, 3], angle, centre)
    a = np.deg2rad(-angle)
    r = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    out[..., :3, :3] = r @ out[..., :3, :3]
    return out


@pytest.fixture(scope="module")
def raw_s3dis(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3dis")
    v12, aligned, images = root / "Stanford3dDataset_v1.2", root / "Aligned_Version", root / "2D-3D-S"
    rooms = {}
    for index, (area, room, image_area, angle) in enumerate(ROOMS):
        sid = f"{area}_{room}"
        truth = truth_scene("s3dis13", index, sid, "val" if area == "Area_5" else "train", width=N, height=N)
        stored = np.round(truth["coord"].astype(np.float64), 3)  # what the text files hold
        centre = (stored.min(0) + stored.max(0)) / 2
        order = np.concatenate(write_s3dis_room(v12, area, room, truth["coord"], truth))
        write_s3dis_room(aligned, area, room, expected_aligned(truth["coord"], angle, centre), truth)
        write_2d3ds_views(images, image_area, room, truth, truth["view_pose"])
        rooms[sid] = {"truth": truth, "order": order, "angle": angle, "centre": centre}
    for area in ("Area_1", "Area_5"):
        write_angle_file(v12, area, {room: a for ar, room, _, a in ROOMS if ar == area})
    # A room whose annotation file has a corrupt line (as one real S3DIS ceiling file does).
    bad = v12 / "Area_2" / "storage_1" / "Annotations"
    bad.mkdir(parents=True)
    (bad / "ceiling_1.txt").write_bytes(b"1.000 2.000 2.500 10 20 30\n1.000 2.1\x1000 2.500 10 20 30\n")
    write_angle_file(v12, "Area_2", {"storage_1": 0})
    return {"root": root, "v12": v12, "aligned": aligned, "images": images, "rooms": rooms}


@pytest.fixture(scope="module")
def prepared(raw_s3dis):
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    out = raw_s3dis["root"] / "out"
    code = cli.main(["prepare", "s3dis", "--raw", str(raw_s3dis["v12"]), "--images", str(raw_s3dis["images"]),
                     "--out", str(out), "--image-size", f"{OUT}x{OUT}"])
    yield {"out": out, "code": code}
    ray.shutdown()


def _scene(out, sid):
    split = "val" if sid.startswith("Area_5") else "train"
    return shards.read_scene(shards.scene_path(out, split, sid))


def test_corrupt_room_fails_by_name_others_complete(prepared):
    assert prepared["code"] == 1
    manifest = shards.load_manifest(prepared["out"])
    assert sorted(e["scene_id"] for e in manifest["scenes"]) == sorted(f"{a}_{r}" for a, r, _, _ in ROOMS)
    assert manifest["splits"] == {"train": 1, "val": 2}
    assert manifest["metadata"]["coordinates"] == "room_aligned"


@pytest.mark.parametrize("sid", [f"{a}_{r}" for a, r, _, _ in ROOMS])
def test_rooms_against_truth(raw_s3dis, prepared, sid):
    room = raw_s3dis["rooms"][sid]
    truth, order, angle, centre = room["truth"], room["order"], room["angle"], room["centre"]
    scene = _scene(prepared["out"], sid)
    # Points in the room-aligned frame (the file stores millimetres).
    np.testing.assert_allclose(scene["coord"], expected_aligned(truth["coord"][order], angle, centre), atol=1e-3)
    np.testing.assert_array_equal(scene["color"], truth["color"][order])
    np.testing.assert_array_equal(scene["label"], truth["label"][order])  # 'stairs' file -> clutter
    # One instance id per annotation file, numbered in file-name order.
    pairs = np.unique(np.stack([truth["instance"][order], scene["instance"]], 1), axis=0)
    assert len(pairs) == len(np.unique(truth["instance"])) == len(np.unique(scene["instance"]))
    assert np.nonzero(scene["tags"])[0].tolist() == np.unique(truth["label"]).tolist()
    assert scene["room_angle"].item() == angle and scene["room_angle_source"].item() == 1
    # Views: every view of the room, poses through camera_rt_matrix (+ the area_5b correction).
    assert scene["view_frame"].tolist() == list(range(len(truth["view_rgb"])))
    np.testing.assert_allclose(scene["view_pose"], aligned_pose(truth["view_pose"], angle, centre), atol=2e-4)
    K = truth["view_intrinsics"][0]
    s = OUT / N
    expect_K = [[K[0, 0] * s, 0, (K[0, 2] + 0.5) * s - 0.5], [0, K[1, 1] * s, (K[1, 2] + 0.5) * s - 0.5], [0, 0, 1]]
    np.testing.assert_allclose(scene["view_intrinsics"][0], expect_K, atol=1e-4)
    # Depth: /512 m quantisation, 65535 -> 0, nearest neighbour (output i <- input 2i + 1).
    np.testing.assert_allclose(scene["view_depth"], truth["view_depth"][:, 1::2, 1::2], atol=2.5e-3)
    half = truth["view_rgb"].reshape(-1, OUT, 2, OUT, 2, 3).mean(axis=(2, 4))
    assert np.abs(scene["view_rgb"].astype(float) - half).mean() < 10
    # Normals: unit, and floor normals point up.
    np.testing.assert_allclose(np.linalg.norm(scene["normal"], axis=1), 1.0, atol=1e-4)
    floor = scene["label"] == S3DIS13.index("floor")
    assert np.median(scene["normal"][floor][:, 2]) > 0.95


def test_aligned_version_angles_are_estimated(raw_s3dis, prepared):
    opts = s3dis.S3DISOptions(image_width=OUT, image_height=OUT)
    tasks, notes = s3dis.plan_tasks(raw_s3dis["aligned"], raw_s3dis["images"], opts)
    assert notes["points_frame"] == {"Area_1": "aligned", "Area_5": "aligned"}
    for task in tasks:  # built in-process: the same function the Ray task runs
        scene = task.make()
        reference = _scene(prepared["out"], task.scene_id)
        assert scene["room_angle"].item() == raw_s3dis["rooms"][task.scene_id]["angle"]
        assert scene["room_angle_source"].item() == 2
        np.testing.assert_allclose(scene["coord"], reference["coord"], atol=1e-3)
        np.testing.assert_allclose(scene["view_pose"], reference["view_pose"], atol=1e-3)


def test_global_frame_keeps_area_coordinates(raw_s3dis):
    opts = s3dis.S3DISOptions(image_width=OUT, image_height=OUT, room_frame="global")
    tasks, _ = s3dis.plan_tasks(raw_s3dis["v12"], raw_s3dis["images"], opts)
    task = next(t for t in tasks if t.scene_id == "Area_5_office_2")  # an area_5b room
    scene = task.make()
    room = raw_s3dis["rooms"]["Area_5_office_2"]
    np.testing.assert_allclose(scene["coord"], room["truth"]["coord"][room["order"]], atol=1e-3)
    np.testing.assert_allclose(scene["view_pose"], room["truth"]["view_pose"], atol=2e-4)
    np.testing.assert_allclose(scene["room_transform"], np.eye(4), atol=1e-6)


def test_second_run_skips_and_names_the_corrupt_line(raw_s3dis, prepared):
    opts = s3dis.S3DISOptions(image_width=OUT, image_height=OUT)
    summary = s3dis.prepare_s3dis(raw_s3dis["v12"], raw_s3dis["images"], prepared["out"], opts)
    assert sorted(summary.skipped) == sorted(f"{a}_{r}" for a, r, _, _ in ROOMS)
    assert list(summary.failed) == ["Area_2_storage_1"]
    assert "ceiling_1.txt:2" in summary.failed["Area_2_storage_1"]


def test_other_settings_into_a_prepared_folder_are_refused(raw_s3dis, prepared, capsys):
    before = (prepared["out"] / "manifest.json").read_bytes()
    assert cli.main(["prepare", "s3dis", "--raw", str(raw_s3dis["v12"]), "--images", str(raw_s3dis["images"]),
                     "--out", str(prepared["out"]), "--image-size", f"{2 * OUT}x{OUT}"]) == 2
    err = capsys.readouterr().err
    assert f"image_width: {OUT} there, {2 * OUT} now" in err and "image_height" not in err
    assert cli.main(["prepare", "s3dis", "--raw", str(raw_s3dis["v12"]), "--out", str(prepared["out"]),
                     "--image-size", f"{OUT}x{OUT}"]) == 2  # 3D only into a folder with views
    assert "with_views: True there, False now" in capsys.readouterr().err
    assert (prepared["out"] / "manifest.json").read_bytes() == before


def test_bad_inputs_are_named(tmp_path):
    ann = tmp_path / "Area_1" / "room_1" / "Annotations"
    ann.mkdir(parents=True)
    (ann / "lamp_1.txt").write_text("0 0 0 1 2 3\n")
    with pytest.raises(ValueError, match="lamp_1.txt: unknown S3DIS class 'lamp'"):
        s3dis.read_room_points(ann.parent)
    (ann / "lamp_1.txt").write_text("0 0 0 1 2\n")
    with pytest.raises(ValueError, match="lamp_1.txt:1: expected 6 values"):
        s3dis.read_annotation_file(ann / "lamp_1.txt")
    with pytest.raises(FileNotFoundError, match="nope"):
        s3dis.plan_tasks(tmp_path / "nope", None, s3dis.S3DISOptions())
    write_angle_file(tmp_path, "Area_1", {"room_2": 90})
    (task,), _ = s3dis.plan_tasks(tmp_path, None, s3dis.S3DISOptions())
    with pytest.raises(ValueError, match="Area_1_room_1: no line for room_1 in Area_1_alignmentAngle.txt"):
        task.make()
    assert cli.main(["prepare", "s3dis", "--raw", str(tmp_path), "--images", str(tmp_path / "no_images"),
                     "--out", str(tmp_path / "out")]) == 2


def test_pca_normals_face_the_room_centre():
    rng = np.random.default_rng(0)
    floor = np.column_stack([rng.random((200, 2)) * 4, np.zeros(200)])
    wall = np.column_stack([np.full(200, -3.0), rng.random(200) * 4, rng.random(200) * 3])  # apart
    n = s3dis.pca_normals(np.concatenate([floor, wall]), 8, np.array([2.0, 2.0, 1.5]))
    np.testing.assert_allclose(n[:200], np.tile([0, 0, 1], (200, 1)), atol=1e-6)
    np.testing.assert_allclose(n[200:], np.tile([1, 0, 0], (200, 1)), atol=1e-6)
