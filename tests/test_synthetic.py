"""The synthetic generator: determinism, the scene contract, and that the ray-cast views agree
with the point cloud (depth, class and colour of the points that project onto a pixel)."""

import numpy as np
import pytest

from rayseg.config import ConfigError, SyntheticConfig
from rayseg.data import synthetic
from rayseg.data.scene import IGNORE_LABEL, S3DIS13, SCANNET20, validate_scene

VOXEL = 0.04  # occlusion tolerance of the point-pixel links, as in METHOD.md


@pytest.fixture(scope="module")
def scannet_cfg():
    return SyntheticConfig(num_scenes=16, num_views=4, seed=3)


@pytest.fixture(scope="module")
def scannet_scenes(scannet_cfg):
    # one scene of each of the first four room types, with full-size views
    return [synthetic.generate_scene(scannet_cfg, i) for i in range(4)]


@pytest.fixture(scope="module")
def tag_only_scenes():
    cfg = SyntheticConfig(num_scenes=14, num_views=0, seed=5)
    return [synthetic.generate_scene(cfg, i) for i in range(cfg.num_scenes)]


def project(scene, v):
    """Project every point into view v: (pixel row, col, camera z, mask of points inside the image)."""
    pose, k = scene["view_pose"][v].astype(np.float64), scene["view_intrinsics"][v].astype(np.float64)
    cam = (scene["coord"].astype(np.float64) - pose[:3, 3]) @ pose[:3, :3]  # inverse of camera-to-world
    z = cam[:, 2]
    h, w = scene["view_depth"].shape[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        col = np.round(k[0, 0] * cam[:, 0] / z + k[0, 2])
        row = np.round(k[1, 1] * cam[:, 1] / z + k[1, 2])
    inside = (z > 0.1) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    return row[inside].astype(int), col[inside].astype(int), z[inside], np.flatnonzero(inside)


def links(scene, v):
    """(point index, row, col) of points that land on a pixel whose depth agrees within a voxel,
    and the number of in-image points not hidden behind that pixel's surface."""
    row, col, z, idx = project(scene, v)
    depth = scene["view_depth"][v][row, col]
    candidates = (depth > 0) & (z <= depth + VOXEL)
    agree = candidates & (np.abs(depth - z) <= VOXEL)
    return idx[agree], row[agree], col[agree], int(candidates.sum())


def test_same_index_same_scene_other_index_other_scene(scannet_cfg, scannet_scenes):
    again = synthetic.generate_scene(scannet_cfg, 1)
    first = scannet_scenes[1]
    assert again.keys() == first.keys()
    for key, value in first.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(again[key], value, err_msg=key)
        else:
            assert again[key] == value
    other = scannet_scenes[2]
    assert other["scene_id"] != first["scene_id"]
    assert other["coord"].shape != first["coord"].shape or not np.array_equal(other["coord"], first["coord"])
    assert not np.array_equal(other["view_rgb"], first["view_rgb"])
    # a different base seed gives a different scene for the same index
    reseeded = synthetic.generate_scene(SyntheticConfig(num_scenes=16, num_views=1, seed=4), 1)
    assert reseeded["coord"].shape != first["coord"].shape or not np.allclose(reseeded["coord"], first["coord"])


def test_records_follow_the_scene_contract(scannet_cfg, scannet_scenes):
    for scene in scannet_scenes:
        validate_scene(scene, num_classes=len(SCANNET20))
        n = len(scene["coord"])
        assert scannet_cfg.min_points <= n <= scannet_cfg.max_points
        expected = {"coord": np.float32, "color": np.uint8, "normal": np.float32, "label": np.uint8,
                    "instance": np.int32, "tags": np.uint8, "view_rgb": np.uint8, "view_depth": np.float32,
                    "view_pose": np.float32, "view_intrinsics": np.float32, "view_frame": np.int32,
                    "view_label": np.uint8}
        for key, dtype in expected.items():
            assert scene[key].dtype == dtype, key
        assert scene["view_rgb"].shape == (4, 240, 320, 3)
        assert scene["view_label"].shape == (4, 240, 320)
        np.testing.assert_allclose(np.linalg.norm(scene["normal"], axis=1), 1.0, atol=1e-5)
        labels = scene["label"]
        assert ((labels < len(SCANNET20)) | (labels == IGNORE_LABEL)).all()
        assert (scene["instance"] >= 0).all()
        assert (scene["view_depth"] >= 0).all() and (scene["view_depth"] > 0).mean() > 0.9
        assert (np.diff(scene["view_frame"]) > 0).all() and scene["view_frame"][0] >= 0
        for pose in scene["view_pose"].astype(np.float64):
            np.testing.assert_allclose(pose[:3, :3].T @ pose[:3, :3], np.eye(3), atol=1e-5)
            assert np.linalg.det(pose[:3, :3]) == pytest.approx(1.0, abs=1e-5)
            np.testing.assert_array_equal(pose[3], [0, 0, 0, 1])
            assert 1.2 <= pose[2, 3] <= 1.8  # eye height
            assert pose[2, 2] < 0  # the optical axis (camera z) points down a bit
        k = scene["view_intrinsics"][0]
        hfov = 2 * np.degrees(np.arctan(320 / 2 / k[0, 0]))
        assert hfov == pytest.approx(scannet_cfg.hfov_deg, abs=0.01)


def test_tags_are_the_classes_of_the_points(scannet_scenes, tag_only_scenes):
    for scene in scannet_scenes + tag_only_scenes:
        present = np.unique(scene["label"][scene["label"] != IGNORE_LABEL])
        np.testing.assert_array_equal(np.flatnonzero(scene["tags"]), present)
        pixel_classes = np.unique(scene["view_label"])
        assert set(pixel_classes[pixel_classes != IGNORE_LABEL]) <= set(present)


def test_rendered_depth_agrees_with_projected_points(scannet_scenes):
    # Misses are points seen at grazing angles, where one pixel spans more than a voxel of depth.
    for scene in scannet_scenes:
        linked = visible = 0
        for v in range(scene["view_depth"].shape[0]):
            idx, _, _, candidates = links(scene, v)
            assert candidates > 500, (scene["scene_id"], v)
            assert len(idx) / candidates >= 0.9, (scene["scene_id"], v, len(idx), candidates)
            linked, visible = linked + len(idx), visible + candidates
        assert linked / visible >= 0.95, (scene["scene_id"], linked / visible)


def test_shared_linker_agrees_with_the_generator(scannet_scenes):
    from rayseg.data.linking import link_points

    for scene in scannet_scenes[:2]:
        for v in range(scene["view_depth"].shape[0]):
            point, pixel = link_points(scene["coord"], scene["view_depth"][v], scene["view_pose"][v],
                                       scene["view_intrinsics"][v], VOXEL)
            mine, _, _, _ = links(scene, v)
            assert abs(len(point) - len(mine)) <= 0.001 * len(mine) + 2  # same projection conventions
            same = scene["view_label"][v].reshape(-1)[pixel] == scene["label"][point]
            assert same.mean() >= 0.95, (scene["scene_id"], v, same.mean())


def back_project(scene, v, mask):
    """World coordinates of the pixels in mask, from depth (camera z), intrinsics and pose."""
    row, col = np.nonzero(mask)
    depth = scene["view_depth"][v][row, col].astype(np.float64)
    k, pose = scene["view_intrinsics"][v].astype(np.float64), scene["view_pose"][v].astype(np.float64)
    cam = np.stack([(col - k[0, 2]) / k[0, 0] * depth, (row - k[1, 2]) / k[1, 1] * depth, depth], axis=1)
    return cam @ pose[:3, :3].T + pose[:3, 3]


def test_depth_is_exact_camera_z_of_the_surfaces(scannet_scenes):
    floor = SCANNET20.index("floor")
    for scene in scannet_scenes:
        floor_points = scene["coord"][scene["label"] == floor]
        assert abs(np.median(floor_points[:, 2])) < 2e-3  # the floor is the plane z = 0
        world = np.concatenate([back_project(scene, v, scene["view_label"][v] == floor)
                                for v in range(scene["view_depth"].shape[0])])
        assert len(world) > 1000, scene["scene_id"]
        np.testing.assert_allclose(world[:, 2], 0.0, atol=2e-3)
        lo, hi = floor_points.min(axis=0), floor_points.max(axis=0)
        assert ((world[:, :2] > lo[:2] - 0.02) & (world[:, :2] < hi[:2] + 0.02)).all()


def test_linked_pixels_have_the_point_class_and_colour(scannet_scenes):
    rng = np.random.default_rng(0)
    for scene in scannet_scenes:
        pixels, points = [], []
        for v in range(scene["view_depth"].shape[0]):
            idx, row, col, _ = links(scene, v)
            same = scene["view_label"][v][row, col] == scene["label"][idx]
            assert same.mean() >= 0.95, (scene["scene_id"], v, same.mean())
            pixels.append(scene["view_rgb"][v][row, col].astype(float))
            points.append(scene["color"][idx].astype(float))
        # 2D and 3D appearance agree: a linked pixel looks like its point, unlike a random pixel.
        # Pooled over the scene's views: one view of a bare wall has little colour variety to shuffle.
        pixel, point = np.concatenate(pixels), np.concatenate(points)
        linked = np.median(np.abs(pixel - point).mean(axis=1))
        shuffled = np.median(np.abs(pixel[rng.permutation(len(pixel))] - point).mean(axis=1))
        assert linked < 12 and linked < 0.5 * shuffled, (scene["scene_id"], linked, shuffled)


def test_scenes_differ_in_their_tags(tag_only_scenes):
    tags = np.stack([s["tags"] for s in tag_only_scenes])
    assert len({t.tobytes() for t in tags}) >= 10  # of 14 scenes
    assert (tags.sum(axis=1) < len(SCANNET20) - 5).all()  # no scene has (nearly) every class
    assert tags[:, SCANNET20.index("wall")].all() and tags[:, SCANNET20.index("floor")].all()
    # two cycles through the room types cover nearly all classes
    assert tags.any(axis=0).sum() >= len(SCANNET20) - 2
    bathroom_only = [SCANNET20.index(c) for c in ("toilet", "bathtub", "shower curtain")]
    bedroom = tags[:, SCANNET20.index("bed")].astype(bool)
    assert not tags[bedroom][:, bathroom_only].any()  # co-occurrence structure: no toilets by beds


def test_room_types_restrict_the_rooms_and_their_classes(tag_only_scenes):
    """`room_types` cycles through the named types only: fewer classes, none of the others' (no
    toilet without a bathroom), and scene i of the full cycle is unchanged where the types agree."""
    cfg = SyntheticConfig(num_scenes=6, num_views=0, seed=5, room_types=("bedroom", "office"))
    assert [synthetic.room_type(cfg, i) for i in range(4)] == ["bedroom", "office", "bedroom", "office"]
    tags = np.stack([synthetic.generate_scene(cfg, i)["tags"] for i in range(cfg.num_scenes)])
    for c in ("toilet", "sink", "bathtub", "refrigerator", "counter", "sofa"):
        assert not tags[:, SCANNET20.index(c)].any(), c
    assert tags[0::2, SCANNET20.index("bed")].all() and tags[1::2, SCANNET20.index("desk")].all()
    # scene 0 is a bedroom either way, drawn from the same (seed, 0): the same room
    assert np.array_equal(tags[0], tag_only_scenes[0]["tags"])
    with pytest.raises(ValueError, match="synthetic.room_types.*garage.*known"):
        synthetic.generate_scene(SyntheticConfig(num_scenes=2, num_views=0, room_types=("garage",)), 0)


def test_mixed_rooms_carry_another_types_signature_objects(tag_only_scenes):
    """mix_p = 1: every room is also furnished by a second type, so objects that one type alone
    holds (bed: bedroom, toilet: bathroom, refrigerator: kitchen) appear in rooms of other types;
    with mix_p = 0 they never do."""
    signature = {"bed": "bedroom", "toilet": "bathroom", "refrigerator": "kitchen"}
    cfg = SyntheticConfig(num_scenes=14, num_views=0, seed=5, mix_p=1.0)
    mixed = [synthetic.generate_scene(cfg, i)["tags"] for i in range(cfg.num_scenes)]

    def foreign(tags_list) -> int:
        return sum(any(tags[SCANNET20.index(c)] and synthetic.room_type(cfg, i) != home
                       for c, home in signature.items()) for i, tags in enumerate(tags_list))

    assert foreign([s["tags"] for s in tag_only_scenes]) == 0
    assert foreign(mixed) >= 3
    # a mixed room holds more than its own type: more classes per room on average
    assert np.mean([m.sum() for m in mixed]) > np.mean([s["tags"].sum() for s in tag_only_scenes]) + 1
    with pytest.raises(ConfigError, match="mix_p"):
        SyntheticConfig(mix_p=1.5)


def test_point_count_follows_density_and_limits():
    sparse = synthetic.generate_scene(SyntheticConfig(num_scenes=2, num_views=0, points_per_m2=100,
                                                      min_points=1000, max_points=400_000), 1)
    dense = synthetic.generate_scene(SyntheticConfig(num_scenes=2, num_views=0, points_per_m2=300,
                                                     min_points=1000, max_points=400_000), 1)
    assert len(dense["coord"]) / len(sparse["coord"]) == pytest.approx(3.0, rel=0.1)
    capped = synthetic.generate_scene(SyntheticConfig(num_scenes=2, num_views=0, points_per_m2=300,
                                                      min_points=1000, max_points=5000), 1)
    assert len(capped["coord"]) == 5000
    floored = synthetic.generate_scene(SyntheticConfig(num_scenes=2, num_views=0, points_per_m2=10,
                                                       min_points=7000, max_points=8000), 1)
    assert len(floored["coord"]) == 7000


def test_s3dis_profile_has_ceilings_beams_columns_boards_clutter():
    cfg = SyntheticConfig(profile="s3dis13", num_scenes=12, num_views=1, image_width=64, image_height=48)
    scenes = [synthetic.generate_scene(cfg, i) for i in range(cfg.num_scenes)]
    tags = np.stack([s["tags"] for s in scenes])
    assert tags.shape[1] == len(S3DIS13)
    assert tags[:, S3DIS13.index("ceiling")].all()  # every S3DIS room has a ceiling
    for name in ("beam", "column", "board", "bookcase", "clutter", "table", "chair", "sofa"):
        assert tags[:, S3DIS13.index(name)].any(), name
    for scene in scenes:
        validate_scene(scene, num_classes=len(S3DIS13))
        assert (scene["label"] != IGNORE_LABEL).all()  # S3DIS labels every point (clutter)
        assert (scene["view_depth"] > 0).all()  # closed rooms: every ray hits something
        ceiling = scene["label"] == S3DIS13.index("ceiling")
        height = np.median(scene["coord"][ceiling, 2])
        assert np.abs(scene["coord"][ceiling, 2] - height).max() < 0.03  # one flat ceiling...
        assert height >= scene["coord"][:, 2].max() - 0.03  # ...above everything else
        world = back_project(scene, 0, scene["view_label"][0] == S3DIS13.index("floor"))
        np.testing.assert_allclose(world[:, 2], 0.0, atol=2e-3)


def test_scene_ids_splits_and_bad_input():
    cfg = SyntheticConfig(num_scenes=8, val_fraction=0.25)
    ids = synthetic.scene_ids(cfg)
    assert ids == synthetic.scene_ids(cfg)
    assert [i for i, _ in ids] == [f"synth_{i:04d}" for i in range(8)]
    assert [s for _, s in ids].count("val") == 2
    assert synthetic.scene_ids(SyntheticConfig(num_scenes=3, val_fraction=0.1))[-1][1] == "val"
    assert synthetic.class_names("scannet20") == SCANNET20
    assert synthetic.class_names("s3dis13") == S3DIS13
    with pytest.raises(ValueError, match="unknown synthetic profile"):
        synthetic.class_names("nyu40")
    with pytest.raises(ValueError, match="out of range"):
        synthetic.generate_scene(cfg, 8)
    with pytest.raises(ConfigError, match="hfov_deg"):
        SyntheticConfig(hfov_deg=170.0)
    with pytest.raises(ConfigError, match="coord_noise"):
        SyntheticConfig(coord_noise=-0.1)
