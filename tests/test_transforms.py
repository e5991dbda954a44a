"""Augmentations, removal, view sampling, voxelisation, Mix3D and point-pixel linking on small
hand-made rooms (real computation, brute-force references)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from rayseg import config as cfgmod
from rayseg.data import pipeline as P
from rayseg.data import transforms as T
from rayseg.data.linking import backproject, link_points, removed_pixel_mask
from rayseg.data.scene import SCANNET20, SceneError

WALL, FLOOR, TABLE, CHAIR = (SCANNET20.index(n) for n in ("wall", "floor", "table", "chair"))
# Region ids of room_scene: floor 0, walls 1..4 (x=0, x=X, y=0, y=Y), table 5, chair 6.
ROOM = (4.0, 3.0, 2.5)


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world pose of an OpenCV camera (x right, y down, z forward) at eye looking at target."""
    z = target - eye
    z = z / np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([x, y, z], 1)
    pose[:3, 3] = eye
    return pose


def render_depth(coord: np.ndarray, pose: np.ndarray, K: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Z-buffer of the points (nearest point depth per pixel, 0 where no point lands)."""
    w2c = np.linalg.inv(pose)
    cam = coord @ w2c[:3, :3].T + w2c[:3, 3]
    z = cam[:, 2]
    front = z > 0.05
    u = np.floor(K[0, 0] * cam[front, 0] / z[front] + K[0, 2] + 0.5).astype(int)
    v = np.floor(K[1, 1] * cam[front, 1] / z[front] + K[1, 2] + 0.5).astype(int)
    zf = z[front]
    ok = (u >= 0) & (u < hw[1]) & (v >= 0) & (v < hw[0])
    depth = np.full(hw, np.inf)
    np.minimum.at(depth, (v[ok], u[ok]), zf[ok])
    depth[~np.isfinite(depth)] = 0.0
    return depth.astype(np.float32)


def room_scene(scene_id: str = "room0", seed: int = 0, num_views: int = 4, hw: tuple[int, int] = (24, 32),
               points_per_m2: float = 120.0, table: bool = True) -> dict:
    """A box room (floor, four walls) with a table and a chair, regions per surface, and
    z-buffer-rendered views from the room's middle. ~3-4k points."""
    rng = np.random.default_rng(seed)
    X, Y, Z = ROOM
    parts = []  # (points, normal, class, region)

    def patch(origin, u, v, normal, cls, region):
        area = np.linalg.norm(u) * np.linalg.norm(v)
        n = max(int(area * points_per_m2), 20)
        a, b = rng.random((2, n, 1))
        pts = np.asarray(origin) + a * np.asarray(u) + b * np.asarray(v)
        parts.append((pts, np.tile(normal, (n, 1)), cls, region))

    patch([0, 0, 0], [X, 0, 0], [0, Y, 0], [0, 0, 1], FLOOR, 0)
    patch([0, 0, 0], [0, Y, 0], [0, 0, Z], [1, 0, 0], WALL, 1)
    patch([X, 0, 0], [0, Y, 0], [0, 0, Z], [-1, 0, 0], WALL, 2)
    patch([0, 0, 0], [X, 0, 0], [0, 0, Z], [0, 1, 0], WALL, 3)
    patch([0, Y, 0], [X, 0, 0], [0, 0, Z], [0, -1, 0], WALL, 4)
    if table:
        patch([1.5, 1.0, 0.75], [1.0, 0, 0], [0, 0.8, 0], [0, 0, 1], TABLE, 5)
    patch([2.8, 0.6, 0.45], [0.45, 0, 0], [0, 0.45, 0], [0, 0, 1], CHAIR, 6)
    coord = np.concatenate([p[0] for p in parts]).astype(np.float32)
    normal = np.concatenate([p[1] for p in parts]).astype(np.float32)
    label = np.concatenate([np.full(len(p[0]), p[2]) for p in parts]).astype(np.uint8)
    region = np.concatenate([np.full(len(p[0]), p[3]) for p in parts]).astype(np.int32)
    palette = rng.integers(30, 220, (len(SCANNET20), 3))
    color = np.clip(palette[label] + rng.normal(0, 12, (len(label), 3)), 0, 255).astype(np.uint8)
    tags = np.zeros(len(SCANNET20), np.uint8)
    tags[np.unique(label)] = 1
    h, w = hw
    K = np.array([[0.5 * w, 0, (w - 1) / 2], [0, 0.5 * w, (h - 1) / 2], [0, 0, 1]])
    eye = np.array([X / 2, Y / 2, 1.4])
    poses, depths, rgbs, vlabels, vregions = [], [], [], [], []
    for i in range(num_views):
        ang = 2 * np.pi * i / max(num_views, 1) + 0.3
        pose = _look_at(eye, eye + np.array([np.cos(ang), np.sin(ang), -0.5]))
        depth = render_depth(coord.astype(np.float64), pose, K, hw)
        poses.append(pose)
        depths.append(depth)
        rgbs.append(rng.integers(0, 256, (h, w, 3)))
        vlabels.append(rng.integers(0, len(SCANNET20), (h, w)))
        vregions.append(rng.integers(-1, 5, (h, w)))
    return {
        "scene_id": scene_id, "split": "train", "coord": coord, "color": color, "normal": normal,
        "label": label, "instance": region.copy(), "tags": tags,
        "region_test": region,
        "view_rgb": np.array(rgbs, np.uint8).reshape(num_views, h, w, 3),
        "view_depth": np.array(depths, np.float32).reshape(num_views, h, w),
        "view_pose": np.array(poses, np.float32).reshape(num_views, 4, 4),
        "view_intrinsics": np.tile(K.astype(np.float32), (num_views, 1, 1)),
        "view_frame": (np.arange(num_views) * 20).astype(np.int32),
        "view_label": np.array(vlabels, np.uint8).reshape(num_views, h, w),
        "view_region_test": np.array(vregions, np.int32).reshape(num_views, h, w),
    }


def small_config(**overrides) -> cfgmod.Config:
    base = {"data.region_column": "test", "data.num_views": 3, "data.image_width": 32, "data.image_height": 24,
            "data.voxel_size": 0.05}
    base.update(overrides)
    return cfgmod.replace(cfgmod.Config(), **base)


# --------------------------------------------------------------------------------------------
# Linking
# --------------------------------------------------------------------------------------------


def test_link_points_known_depth_map_and_occlusion():
    h, w = 20, 30
    K = np.array([[20.0, 0, 14.5], [0, 20.0, 9.5], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, 3] = [1.0, 2.0, 0.5]  # camera at (1, 2, 0.5) looking along +z of the world
    depth = np.full((h, w), 2.0, np.float32)
    depth[3, 4] = 0.0          # invalid depth
    depth[5, 6] = np.nan       # invalid depth
    ys, xs = np.mgrid[0:h, 0:w]
    # One point on the visible surface through every pixel centre (exactly at depth 2).
    x_cam = (xs.ravel() - K[0, 2]) / K[0, 0] * 2.0
    y_cam = (ys.ravel() - K[1, 2]) / K[1, 1] * 2.0
    visible = np.stack([x_cam, y_cam, np.full(x_cam.shape, 2.0)], 1)
    occluded = visible * 1.5  # same pixels, 1 m further: hidden behind the surface
    behind = visible * np.array([1, 1, -1])  # behind the camera
    outside = np.array([[100.0, 0.0, 2.0]])  # beyond the image border
    cam = np.concatenate([visible, occluded, behind, outside])
    world = cam + pose[:3, 3]
    point_idx, pixel = link_points(world, depth, pose, K, tol=0.05)
    n = h * w
    expected = np.array([i for i in range(n) if i not in (3 * w + 4, 5 * w + 6)])
    np.testing.assert_array_equal(point_idx, expected)
    np.testing.assert_array_equal(pixel, expected)  # point i projects to its own pixel centre
    assert point_idx.dtype == np.int64 and pixel.dtype == np.int64
    # tolerance: a point 3 cm off the surface links with tol 5 cm, not with tol 1 cm
    near = world[:1] + np.array([0, 0, 0.03])
    assert link_points(near, depth, pose, K, 0.05)[0].tolist() == [0]
    assert link_points(near, depth, pose, K, 0.01)[0].size == 0
    # a non-finite pose never links
    bad = pose.copy()
    bad[0, 0] = -np.inf
    assert link_points(world, depth, bad, K, 0.05)[0].size == 0


def test_rendered_room_links_most_points_and_rejects_occluded():
    scene = room_scene(num_views=2)
    pose, K, depth = scene["view_pose"][0], scene["view_intrinsics"][0], scene["view_depth"][0]
    idx, pix = link_points(scene["coord"], depth, pose, K, tol=0.05)
    assert idx.size > 100
    # every link agrees with the depth map within the tolerance
    cam = (scene["coord"][idx] - pose[:3, 3]) @ pose[:3, :3]
    assert np.all(np.abs(depth.ravel()[pix] - cam[:, 2]) <= 0.05 + 1e-5)
    # push the linked points 0.5 m away from the camera along their rays: now they are hidden
    ray = scene["coord"][idx] - pose[:3, 3]
    hidden = scene["coord"][idx] + 0.5 * ray / np.linalg.norm(ray, axis=1, keepdims=True)
    assert link_points(hidden, depth, pose, K, tol=0.05)[0].size == 0


def test_backprojection_inverts_linking_and_marks_removed_pixels():
    from scipy.spatial import cKDTree

    scene = room_scene(num_views=2)
    pose, K, depth = scene["view_pose"][0], scene["view_intrinsics"][0], scene["view_depth"][0]
    idx, pix = link_points(scene["coord"], depth, pose, K, tol=0.05)
    flat, xyz = backproject(depth, pose, K)
    where = np.searchsorted(flat, pix)
    np.testing.assert_array_equal(flat[where], pix)  # every linked pixel has a depth
    # a linked pixel's back-projection lies within half a pixel's footprint (+ tol) of its point
    dist = np.linalg.norm(xyz[where] - scene["coord"][idx], axis=1)
    assert np.median(dist) < 0.1 and dist.max() < 0.35

    floor = scene["region_test"] == 0
    tree = cKDTree(scene["coord"])
    for v in range(2):
        pose, depth = scene["view_pose"][v], scene["view_depth"][v]
        mask = removed_pixel_mask(tree, floor, depth, pose, K, max_distance=0.2)
        flat, xyz = backproject(depth, pose, K)
        on_floor = np.zeros(depth.size, bool)
        on_floor[flat] = xyz[:, 2] < 0.1  # the floor is the plane z = 0 (depth rendered from splats)
        assert on_floor.sum() > 50
        assert (mask.reshape(-1) == on_floor).mean() > 0.97  # only the floor/wall seam may differ
        assert not removed_pixel_mask(tree, np.zeros_like(floor), depth, pose, K, 0.2).any()
        assert not removed_pixel_mask(tree, floor, np.zeros_like(depth), pose, K, 0.2).any()  # no depth: kept


# --------------------------------------------------------------------------------------------
# Colour and geometry
# --------------------------------------------------------------------------------------------


def test_colour_ops_keep_range():
    rng = np.random.default_rng(1)
    color = rng.integers(0, 256, (500, 3)).astype(np.float64)
    # hue/saturation: greys have no hue and no saturation, so they stay (up to 8-bit rounding)
    grey = np.repeat(rng.integers(0, 256, (50, 1)), 3, axis=1).astype(np.float64)
    for i in range(5):
        np.testing.assert_allclose(T.hue_saturation_shift(grey, np.random.default_rng(i), 0.5, 0.2), grey, atol=1)
    shifted = T.hue_saturation_shift(color, np.random.default_rng(0), 0.5, 0.2)
    assert shifted.min() >= 0 and shifted.max() <= 255 and np.abs(shifted - color).mean() > 10
    aug = cfgmod.AugmentConfig(autocontrast_p=1.0, color_jitter_std=0.5, color_translate_ratio=0.5)
    for i in range(20):
        out = T.chromatic_augment(color, np.random.default_rng(i), aug)
        assert out.shape == color.shape and out.min() >= 0 and out.max() <= 255
        assert not np.allclose(out, color)
    stretched = T.chromatic_autocontrast(color * 0.5 + 40, np.random.default_rng(0), 1.0)
    assert stretched.max() > (color * 0.5 + 40).max()  # contrast grew
    rgb = rng.integers(0, 256, (2, 6, 8, 3)).astype(np.uint8)
    jit = T.view_color_jitter(rgb, np.random.default_rng(0), (0.3, 0.3, 0.3, 0.1))
    assert jit.dtype == np.uint8 and jit.shape == rgb.shape and not np.array_equal(jit, rgb)
    same = T.view_color_jitter(rgb, np.random.default_rng(0), (0.0, 0.0, 0.0, 0.0))
    np.testing.assert_array_equal(same, rgb)


def _pairwise(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x[:, None] - x[None], axis=-1)


def test_flips_and_rotations_preserve_distances_and_rotate_normals():
    rng = np.random.default_rng(2)
    coord = rng.normal(size=(200, 3))
    normal = rng.normal(size=(200, 3))
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    aug = cfgmod.AugmentConfig()
    for i in range(10):
        c, n = T.augment_geometry(coord, normal, np.random.default_rng(i), aug, strong=False)
        np.testing.assert_allclose(_pairwise(c), _pairwise(coord), atol=1e-9)
        # normals stay unit and keep their angle to the (transformed) coordinates
        np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-9)
        np.testing.assert_allclose((c * n).sum(1), (coord * normal).sum(1), atol=1e-9)
        np.testing.assert_allclose(c[:, 2], coord[:, 2])  # z untouched
    # strong: a similarity up to jitter (<= clip per axis)
    c, _ = T.augment_geometry(coord, normal, np.random.default_rng(0), aug, strong=True)
    ratio = _pairwise(c)[np.triu_indices(200, 1)] / _pairwise(coord)[np.triu_indices(200, 1)]
    assert 0.8 - 0.05 < np.median(ratio) < 1.2 + 0.05
    assert np.abs(c[:, 2] / np.median(ratio) - coord[:, 2]).max() < 2 * 0.02 / 0.8 + 1e-9


# --------------------------------------------------------------------------------------------
# Removal
# --------------------------------------------------------------------------------------------


def test_removal_drops_exactly_the_floor_and_wall_regions_and_clears_their_tags():
    scene = room_scene()
    scene["pseudo_label"] = scene["region_test"] + 100  # stage seg's targets stay aligned
    aug = cfgmod.AugmentConfig(remove_floor_p=1.0, remove_wall_p=0.0)
    out = T.remove_structures(scene, "region_test", SCANNET20, np.random.default_rng(0), aug)
    np.testing.assert_array_equal(out["pseudo_label"], out["region_test"] + 100)
    assert out["tags"][FLOOR] == 0 and out["tags"][WALL] == 1 and out["tags"][TABLE] == 1
    np.testing.assert_array_equal(out["coord"], scene["coord"][scene["region_test"] != 0])
    np.testing.assert_array_equal(out["region_test"], scene["region_test"][scene["region_test"] != 0])
    assert scene["tags"][FLOOR] == 1  # input untouched

    aug = cfgmod.AugmentConfig(remove_floor_p=0.0, remove_wall_p=1.0)
    out = T.remove_structures(scene, "region_test", SCANNET20, np.random.default_rng(0), aug)
    assert out["tags"][WALL] == 0 and out["tags"][FLOOR] == 1
    assert set(np.unique(out["region_test"])) == {0, 5, 6}  # the four walls went, nothing else
    assert out["color"].shape[0] == (np.isin(scene["region_test"], [0, 5, 6])).sum()

    # no floor tag: nothing is removed (the biggest bottom region would be some other object)
    no_floor = dict(scene, tags=scene["tags"].copy())
    no_floor["tags"][FLOOR] = 0
    aug = cfgmod.AugmentConfig(remove_floor_p=1.0, remove_wall_p=0.0)
    assert T.remove_structures(no_floor, "region_test", SCANNET20, np.random.default_rng(0), aug) is no_floor

    # ceiling removal on a class set without a ceiling is a named error
    aug = cfgmod.AugmentConfig(remove_ceiling_p=0.5)
    with pytest.raises(SceneError, match="room0.*no 'ceiling'"):
        T.remove_structures(scene, "region_test", SCANNET20, np.random.default_rng(0), aug)


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


def test_view_sampling_chunks_eval_first_and_bad_poses(caplog):
    scene = room_scene(num_views=7)
    np.testing.assert_array_equal(T.sample_views(scene, 3, None), [0, 3, 5])  # chunks [0-2][3-4][5-6]
    for i in range(10):
        picked = T.sample_views(scene, 3, np.random.default_rng(i))
        assert picked[0] in (0, 1, 2) and picked[1] in (3, 4) and picked[2] in (5, 6)
    scene["view_pose"][0, 0, 0] = np.inf
    scene["view_pose"][4, 1, 3] = np.nan
    with caplog.at_level(logging.WARNING):
        picked = T.sample_views(scene, 3, None)
    np.testing.assert_array_equal(picked, [1, 3, 6])  # valid [1,2,3,5,6] -> chunks [1,2][3,5][6]
    assert "scene room0: dropping view 0 (frame 0)" in caplog.text
    assert "dropping view 4 (frame 80)" in caplog.text
    scene["view_pose"][:] = np.nan
    with pytest.raises(SceneError, match="scene room0: no valid view"):
        T.sample_views(scene, 3, None)
    assert T.sample_views(scene, 0, None).size == 0  # no views needed: no error


# --------------------------------------------------------------------------------------------
# Voxelisation and Mix3D
# --------------------------------------------------------------------------------------------


def _brute_force_voxelize(coord, feat, size):
    cells: dict[tuple, list[int]] = {}
    for i, p in enumerate(coord):
        cells.setdefault(tuple(int(np.floor(v / size)) for v in p), []).append(i)
    return {k: (np.mean(feat[idx], 0), len(idx), idx) for k, idx in cells.items()}


def test_voxelize_matches_brute_force():
    rng = np.random.default_rng(3)
    coord = rng.uniform(-0.5, 0.5, (400, 3))
    feat = rng.normal(size=(400, 6))
    vox = T.voxelize(coord, feat, 0.1)
    ref = _brute_force_voxelize(coord, feat, 0.1)
    assert vox["voxel_coord"].shape == (len(ref), 3) and vox["voxel_coord"].dtype == np.int32
    keys = [tuple(k) for k in vox["voxel_coord"].tolist()]
    assert keys == sorted(keys)  # deterministic order
    for row, key in enumerate(keys):
        mean, count, idx = ref[key]
        np.testing.assert_allclose(vox["voxel_feat"][row], mean, rtol=1e-5, atol=1e-6)
        assert vox["voxel_count"][row] == count
        assert np.all(vox["inverse"][idx] == row)
    again = T.voxelize(coord, feat, 0.1)
    for k in vox:
        np.testing.assert_array_equal(vox[k], again[k])


def test_mix3d_merge_equals_voxelizing_the_overlaid_clouds():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(-1, 1, (300, 3)), rng.uniform(-1, 1, (200, 3))
    fa, fb = rng.normal(size=(300, 6)), rng.normal(size=(200, 6))
    size, shift = 0.25, np.array([2, -1, 0])
    va, vb = T.voxelize(a, fa, size), T.voxelize(b, fb, size)
    merged = T.merge_voxels([(va["voxel_coord"], va["voxel_feat"], va["voxel_count"], va["inverse"]),
                             (vb["voxel_coord"] + shift, vb["voxel_feat"], vb["voxel_count"], vb["inverse"])])
    direct = T.voxelize(np.concatenate([a, b + shift * size]), np.concatenate([fa, fb]), size)
    np.testing.assert_array_equal(merged["voxel_coord"], direct["voxel_coord"])
    np.testing.assert_array_equal(merged["inverse"], direct["inverse"])
    np.testing.assert_array_equal(merged["voxel_count"], direct["voxel_count"])
    np.testing.assert_allclose(merged["voxel_feat"], direct["voxel_feat"], rtol=1e-5, atol=1e-6)
    assert len(merged["voxel_coord"]) < len(va["voxel_coord"]) + len(vb["voxel_coord"])  # they overlap


def test_mix3d_ors_tags_offsets_regions_and_keeps_links_in_their_scene():
    cfg = small_config(**{"augment.mix3d": True})  # off by default, as in the reference's configs
    first = room_scene("a", seed=1, table=False)
    second = room_scene("b", seed=2)
    second["tags"][CHAIR] = 0  # make the tag sets differ: a has no table, b "has no chair"
    sa = P.make_sample(first, cfg, np.random.default_rng(0), "train", SCANNET20)
    sb = P.make_sample(second, cfg, np.random.default_rng(1), "train", SCANNET20)
    mixed = P.mix3d(sa, sb)
    np.testing.assert_array_equal(mixed["tags"], np.maximum(sa["tags"], sb["tags"]))
    assert mixed["tags"][TABLE] == 1 and mixed["tags"][CHAIR] == 1
    na, va = sa["inverse"].size, sa["images"].shape[0]
    assert mixed["inverse"].size == na + sb["inverse"].size
    assert mixed["images"].shape[0] == va + sb["images"].shape[0]
    batch = P.collate([sa, sb])  # Mix3D is on: one student sample, two teacher samples
    assert batch["scene_id"] == ["a+b"] and batch["teacher_scene_id"] == ["a", "b"]
    np.testing.assert_array_equal(batch["tags"][0], mixed["tags"])
    ra, rb = batch["region"][:na], batch["region"][na:]
    assert set(ra[ra >= 0]).isdisjoint(set(rb[rb >= 0]))
    np.testing.assert_array_equal(rb, np.where(sb["region"] >= 0, sb["region"] + sa["region"].max() + 1, -1))
    # links of a's points go to a's views only, b's to b's views only
    from_a = batch["link_point"] < na
    assert from_a.sum() == sa["link_point"].size and (~from_a).sum() == sb["link_point"].size
    assert np.all(batch["link_view"][from_a] < va) and np.all(batch["link_view"][~from_a] >= va)
    # the student's overlaid cloud: a's voxels where they were, b's moved by its mix_offset voxels
    pos = batch["coord"][batch["inverse"], 1:].astype(np.int64)
    shift_a = pos[:na] - sa["coord"][sa["inverse"]]
    shift_b = pos[na:] - (sb["coord"] + sb["mix_offset"])[sb["inverse"]]
    assert (shift_a == shift_a[0]).all() and (shift_b == shift_a[0]).all()  # one common frame
    assert np.abs(sb["mix_offset"][:2]).max() > 0


def test_rotation_and_chromatic_probabilities():
    """The reference's probabilities: a z-rotation with p 0.5 per side, chromatic translation
    and jitter with p 0.95 each; 0 and 1 switch them off and on."""
    rng = np.random.default_rng(0)
    coord = rng.normal(size=(50, 3)).astype(np.float32)
    normal = np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (50, 1))
    off = small_config(**{"augment.flip_xy": False, "augment.rotate_p": 0.0}).augment
    on = small_config(**{"augment.flip_xy": False, "augment.rotate_p": 1.0}).augment
    same, _ = T.augment_geometry(coord, normal, np.random.default_rng(1), off, strong=False)
    np.testing.assert_array_equal(same, coord)
    turned, turned_normal = T.augment_geometry(coord, normal, np.random.default_rng(1), on, strong=False)
    assert not np.allclose(turned, coord) and np.allclose(np.linalg.norm(turned - turned.mean(0), axis=1),
                                                          np.linalg.norm(coord - coord.mean(0), axis=1), atol=1e-5)
    rotated = sum(not np.allclose(T.augment_geometry(coord, normal, np.random.default_rng(s),
                                                     small_config(**{"augment.flip_xy": False}).augment,
                                                     strong=False)[0], coord) for s in range(200))
    assert 70 < rotated < 130  # p 0.5 by default
    color = np.full((20, 3), 120.0)
    plain = {"augment.autocontrast_p": 0.0, "augment.hue_max": 0.0, "augment.saturation_max": 0.0}
    kept = T.chromatic_augment(color, np.random.default_rng(2), small_config(**plain, **{"augment.chromatic_p": 0.0}).augment)
    np.testing.assert_array_equal(kept, color)
    moved = T.chromatic_augment(color, np.random.default_rng(2), small_config(**plain, **{"augment.chromatic_p": 1.0}).augment)
    assert np.abs(moved - color).max() > 1.0
