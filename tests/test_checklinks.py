"""`rayseg check-links`: passes on correctly prepared fixtures, fails on broken pose conventions."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures_raw import (truth_scene, write_2d3ds_views, write_angle_file, write_s3dis_room,
                          write_scannet_scene, z_rotation)
from rayseg import cli
from rayseg.data import checklinks, s3dis, scannet, shards

ALIGN = z_rotation(40.0, (1.0, 2.0, 0.0))


def _dataset(root, scenes, profile):
    for scene in scenes:
        shards.write_scene(root, scene)
    shards.write_manifest(root, profile)
    return root


@pytest.fixture(scope="module")
def scannet_scenes(tmp_path_factory):
    raw = tmp_path_factory.mktemp("scannet_raw")
    opts = scannet.ScanNetOptions(frame_skip=1, image_width=48, image_height=36)
    scenes = []
    for i in range(2):
        sid = f"scene000{i}_00"
        truth = truth_scene("scannet20", i, sid, "train", width=48, height=36)
        write_scannet_scene(raw, sid, truth, ALIGN, nyu40=np.ones(len(truth["coord"]), np.uint16),
                            frame_skip=1, bad_view=None)
        scenes.append(scannet.load_scene(raw / sid, sid, "train", opts))
    return scenes


def _s3dis_scene(raw_root, transpose_rotation):
    truth = truth_scene("s3dis13", 0, "Area_1_office_1", "train", width=40, height=40)
    raw, images = raw_root / "v12", raw_root / "images"
    write_s3dis_room(raw, "Area_1", "office_1", truth["coord"], truth)
    write_angle_file(raw, "Area_1", {"office_1": 90})
    write_2d3ds_views(images, "area_1", "office_1", truth, truth["view_pose"], transpose_rotation)
    (task,) = s3dis.plan_tasks(raw, images, s3dis.S3DISOptions(image_width=40, image_height=40))[0]
    return task.make()


def test_aligned_scannet_passes_with_a_clear_gap(tmp_path, scannet_scenes, capsys):
    root = _dataset(tmp_path / "ok", scannet_scenes, "scannet20")
    assert cli.main(["check-links", str(root), "--scenes", "5"]) == 0
    out = capsys.readouterr().out
    assert "verdict: aligned" in out and "scene0000_00" in out and "scene0001_00" in out
    assert "link|d-z|: median |depth - z| of the accepted links (<= 0.05 m)" in out
    opts = checklinks.CheckLinksOptions()
    report = checklinks.check_links(root, opts)
    for r in report["scenes"]:
        assert r["linked_fraction"] > 0.1 and r["median_window_error"] < 0.03
        assert r["color_diff"] < 0.5 * r["shuffled_color_diff"]
        # The accepted links' figure is its own number: within tol, and below the window's, which
        # also counts occluded candidates (on the real scene: 1.5 cm against 3.7 cm).
        assert r["median_link_error"] <= opts.tol and r["median_link_error"] < r["median_window_error"]
        row = next(line for line in out.splitlines() if line.startswith(r["scene_id"]))
        assert f"{r['median_link_error']:.4f}" in row.split() and f"{r['median_window_error']:.3f}" in row.split()


def test_poses_left_in_scan_frame_fail(tmp_path, scannet_scenes, capsys):
    # Points axis-aligned but poses not: the mistake the axis-alignment code must not make.
    broken = [{**s, "view_pose": (np.linalg.inv(ALIGN) @ s["view_pose"]).astype(np.float32)}
              for s in scannet_scenes]
    root = _dataset(tmp_path / "bad", broken, "scannet20")
    assert cli.main(["check-links", str(root)]) == 1
    assert "verdict: MISALIGNED (2 of 2 scenes" in capsys.readouterr().out


def test_s3dis_passes_and_transposed_pose_fails(tmp_path, capsys):
    good = _s3dis_scene(tmp_path / "good", transpose_rotation=False)
    bad = _s3dis_scene(tmp_path / "bad", transpose_rotation=True)
    opts = checklinks.CheckLinksOptions()
    ok, broken = checklinks.scene_link_stats(good, opts), checklinks.scene_link_stats(bad, opts)
    assert ok["aligned"] and not broken["aligned"]
    assert ok["color_ratio"] < 0.5 and ok["median_window_error"] < 0.05
    # A transposed rotation looks elsewhere: only chance links, depth errors spread over the
    # candidate window (median ~ half of it), or no candidate at all (median NaN).
    assert broken["links"] < opts.min_links and not broken["median_window_error"] <= 0.15
    assert cli.main(["check-links", str(_dataset(tmp_path / "ok", [good], "s3dis13"))]) == 0
    assert cli.main(["check-links", str(_dataset(tmp_path / "ko", [bad], "s3dis13"))]) == 1
    assert "MISALIGNED" in capsys.readouterr().out


def test_missing_dataset_is_named(tmp_path, capsys):
    assert cli.main(["check-links", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
