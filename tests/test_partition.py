"""Partition algorithms on hand-built scenes with known answers, 2D regions, the oracle metric,
and bad input (pure numpy, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rayseg import config as cfgmod
from rayseg.config import PartitionConfig, SyntheticConfig
from rayseg.data import synthetic
from rayseg.data.linking import link_points
from rayseg.data.scene import IGNORE_LABEL, NO_REGION
from rayseg.partition import (METHODS, PartitionError, area_per_point, estimate_normals, geometry,
                              job, min_size_warning, partition_points, quality, views)

REPO = Path(__file__).resolve().parents[1]
CFG = PartitionConfig()
UNSUPERVISED = list(METHODS)


def grid(nu: int, nv: int, spacing: float, origin, u, v) -> np.ndarray:
    a, b = np.meshgrid(np.arange(nu), np.arange(nv), indexing="ij")
    pts = (np.asarray(origin, float) + a.reshape(-1, 1) * spacing * np.asarray(u, float)
           + b.reshape(-1, 1) * spacing * np.asarray(v, float))
    return pts.astype(np.float32)


def two_planes() -> tuple[np.ndarray, np.ndarray]:
    """A 1 x 1 m floor and a 1 x 1 m wall meeting at 90 degrees along the y axis."""
    floor = grid(50, 50, 0.02, (0.01, 0, 0), (1, 0, 0), (0, 1, 0))
    wall = grid(50, 50, 0.02, (0, 0, 0.01), (0, 1, 0), (0, 0, 1))
    return np.concatenate([floor, wall]), np.repeat([0, 1], [len(floor), len(wall)])


def box(size: float = 1.0, spacing: float = 0.025) -> tuple[np.ndarray, np.ndarray]:
    """The six faces of a cube, sampled on grids inset by half a spacing (no shared edges)."""
    n = int(round(size / spacing))
    g = (np.arange(n) + 0.5) * spacing
    a, b = [m.ravel() for m in np.meshgrid(g, g, indexing="ij")]
    pts, face = [], []
    for f in range(6):
        axis, value = f // 2, (0.0 if f % 2 == 0 else size)
        p = np.zeros((a.size, 3))
        others = [i for i in range(3) if i != axis]
        p[:, others[0]], p[:, others[1]], p[:, axis] = a, b, value
        pts.append(p)
        face.append(np.full(a.size, f))
    return np.concatenate(pts).astype(np.float32), np.concatenate(face)


def noisy_plane(seed: int = 0, sigma: float = 0.003) -> np.ndarray:
    pts = grid(60, 60, 0.02, (0, 0, 0), (1, 0, 0), (0, 1, 0))
    pts[:, 2] += np.random.default_rng(seed).normal(0, sigma, len(pts)).astype(np.float32)
    return pts


def assert_recovers(region: np.ndarray, truth: np.ndarray, min_recall: float) -> None:
    """Each true part's majority region is distinct and holds >= min_recall of the part."""
    majority = []
    for t in np.unique(truth):
        r = region[truth == t]
        r = r[r >= 0]
        assert r.size, f"part {t} has no region at all"
        counts = np.bincount(r)
        majority.append(int(counts.argmax()))
        assert counts.max() >= min_recall * (truth == t).sum(), f"part {t}: {counts.max()} of {(truth == t).sum()}"
    assert len(set(majority)) == len(majority), f"parts share a region: {majority}"


@pytest.mark.parametrize("method", ["region_growing", "shape_detection"])
def test_two_planes_at_right_angle_give_two_regions(method):
    coord, truth = two_planes()
    region = partition_points(method, coord, None, None, CFG)
    assert int(region.max()) + 1 == 2
    assert_recovers(region, truth, 0.95)


@pytest.mark.parametrize("method", ["region_growing", "shape_detection"])
def test_box_gives_six_faces(method):
    coord, face = box()
    region = partition_points(method, coord, None, None, CFG)
    assert int(region.max()) + 1 == 6
    assert_recovers(region, face, 0.9)
    if method == "shape_detection":  # every leftover point joined its nearest region
        assert (region >= 0).all()
        assert (region == geometry.dense_labels(region)).all()


@pytest.mark.parametrize("method", ["region_growing", "shape_detection", "vccs_rg"])
def test_noisy_plane_is_one_region(method):
    region = partition_points(method, noisy_plane(), None, None, CFG)
    assert int(region.max()) + 1 == 1
    assert (region == 0).mean() > 0.97


def test_vccs_supervoxels_are_compact_and_seed_sized():
    coord = noisy_plane()  # 1.2 x 1.2 m
    region = partition_points("vccs", coord, None, None, CFG)
    count = int(region.max()) + 1
    cells = (1.2 / CFG.vccs_seed_resolution) ** 2  # ~23 seed cubes cover the plane
    assert cells / 2 <= count <= 2 * cells, count
    sizes = np.bincount(region)
    assert np.median(sizes) >= 0.3 * len(coord) / cells
    for r in range(count):  # spatially compact: no supervoxel strays far from its centre
        pts = coord[region == r, :2]
        radius = np.linalg.norm(pts - pts.mean(axis=0), axis=1).max()
        assert radius <= 1.5 * CFG.vccs_seed_resolution, (r, radius)


def test_vccs_rg_merges_the_supervoxels_of_a_plane_but_not_across_a_crease():
    coord = noisy_plane()
    assert int(partition_points("vccs", coord, None, None, CFG).max()) + 1 > 10
    assert int(partition_points("vccs_rg", coord, None, None, CFG).max()) + 1 == 1
    coord, truth = two_planes()
    region = partition_points("vccs_rg", coord, None, None, CFG)
    assert_recovers(region, truth, 0.9)


def small_room(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    parts = [grid(60, 50, 0.05, (0, 0, 0), (1, 0, 0), (0, 1, 0)),
             grid(60, 30, 0.05, (0, 0, 0.05), (1, 0, 0), (0, 0, 1)),
             grid(50, 30, 0.05, (0, 0.05, 0.05), (0, 1, 0), (0, 0, 1))]
    coord = np.concatenate(parts)
    coord += rng.normal(0, 0.002, coord.shape).astype(np.float32)
    color = rng.integers(0, 255, (len(coord), 3), dtype=np.uint8)
    return coord, color


@pytest.mark.parametrize("method", UNSUPERVISED)
def test_every_point_labelled_dense_and_deterministic(method):
    coord, color = small_room()
    first = partition_points(method, coord, color, None, CFG)
    again = partition_points(method, coord.copy(), color.copy(), None, CFG)
    assert first.dtype == np.int32 and first.shape == (len(coord),)
    np.testing.assert_array_equal(first, again)
    labelled = first[first >= 0]
    assert set(np.unique(labelled)) == set(range(int(first.max()) + 1))  # dense 0..R-1
    if method != "region_growing":  # the only method documented to leave NO_REGION points
        assert (first >= 0).all()
    else:
        assert (first == NO_REGION).mean() < 0.2


def test_given_normals_are_used_and_zero_normals_are_estimated():
    coord, truth = two_planes()
    normal = np.where(truth[:, None] == 0, [0, 0, 1], [1, 0, 0]).astype(np.float32)
    given = partition_points("region_growing", coord, None, normal, CFG)
    assert (given >= 0).all()  # exact normals: no blurred crease, nothing dissolved
    assert_recovers(given, truth, 1.0)
    estimated = partition_points("region_growing", coord, None, np.zeros_like(normal), CFG)
    assert (estimated < 0).sum() > 0  # PCA normals blur the crease: those points are dissolved


def test_estimated_normals_are_unit_and_oriented_towards_the_viewpoint():
    coord, truth = two_planes()
    normal = estimate_normals(coord, k=12, viewpoint=np.array([0.5, 0.5, 0.5]))
    np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1, atol=1e-5)
    floor = (truth == 0) & (coord[:, 0] > 0.1)  # away from the crease
    wall = (truth == 1) & (coord[:, 2] > 0.1)
    assert (normal[floor, 2] > 0.99).all()  # floor normals point up, towards the viewpoint
    assert (normal[wall, 0] > 0.99).all()  # wall normals point into the room


def test_closed_form_eigen_matches_numpy():
    a = np.random.default_rng(1).normal(size=(500, 3, 3))
    cov = a @ a.transpose(0, 2, 1)
    evals, vec = geometry.sym3_smallest(cov)
    ref_vals, ref_vecs = np.linalg.eigh(cov)
    np.testing.assert_allclose(evals, ref_vals, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(np.abs(np.einsum("ij,ij->i", vec, ref_vecs[:, :, 0])), 1, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# The oracle metric
# ---------------------------------------------------------------------------------------------


def test_oracle_quality_on_a_constructed_case():
    label = np.array([0, 0, 0, 1, 1, 2, 2, 2, IGNORE_LABEL])
    region = np.array([0, 0, 0, 0, 1, 1, 2, NO_REGION, 2])
    # region 0 -> class 0 (3 of 4); region 1 = {1, 2} tie -> lowest class 1; region 2 -> class 2
    # (the IGNORE point does not vote); the NO_REGION point keeps its own class.
    pred = quality.oracle_prediction(region, label, 3)
    np.testing.assert_array_equal(pred[:8], [0, 0, 0, 0, 1, 1, 2, 2])
    miou, iou = quality.iou_from_confusion(quality.confusion(pred, label, 3))
    np.testing.assert_allclose(iou, [3 / 4, 1 / 3, 2 / 3])
    assert miou == pytest.approx((3 / 4 + 1 / 3 + 2 / 3) / 3)
    acc = quality.QualityAccumulator(3)
    acc.add(region, label)
    summary = acc.summary()
    assert summary["regions_per_scene"] == 3
    assert summary["mean_region_size"] == pytest.approx(8 / 3)
    assert summary["unassigned_fraction"] == pytest.approx(1 / 9)
    assert summary["oracle_miou"] == pytest.approx(miou)
    # Perfect regions give 100%, a single region gives the majority class only.
    assert quality.iou_from_confusion(quality.confusion(quality.oracle_prediction(
        label[:8], label[:8], 3), label[:8], 3))[0] == 1.0
    one = quality.oracle_prediction(np.zeros(8, int), label[:8], 3)
    assert (one == 0).all()  # classes 0 and 2 tie with 3 points each: the lowest id wins


# ---------------------------------------------------------------------------------------------
# 2D regions
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_scene():
    cfg = SyntheticConfig(num_views=1, image_width=160, image_height=120, min_points=5000,
                          max_points=20000)
    return synthetic.generate_scene(cfg, 1)


def _consistency(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pairs explained by mapping every value of a to its most frequent partner in b."""
    table = np.zeros((a.max() + 1, b.max() + 1), np.int64)
    np.add.at(table, (a, b), 1)
    return table.max(axis=1).sum() / a.size


def test_2d_regions_agree_with_3d_regions_of_linked_points(synthetic_scene):
    scene = synthetic_scene
    cols = job.partition_scene(scene, ["shape_detection"], CFG)
    r3, r2 = cols["region_shape_detection"], cols["view_region_shape_detection"]
    assert r2.shape == scene["view_depth"].shape and r2.dtype == np.int32
    depth = scene["view_depth"][0]
    assert ((r2[0] == NO_REGION) == ~(depth > 0)).all()  # NO_REGION exactly where depth is invalid
    point, pixel = link_points(scene["coord"], depth, scene["view_pose"][0],
                               scene["view_intrinsics"][0], 0.05)
    assert point.size > 1000
    a, b = r3[point], r2[0].reshape(-1)[pixel]
    assert _consistency(b, a) > 0.8  # a pixel region covers one 3D region
    assert _consistency(a, b) > 0.8  # and a 3D region one pixel region


def test_view_regions_edge_cases(synthetic_scene):
    scene = synthetic_scene
    rgb, depth, pose, K = (scene[k][0] for k in ("view_rgb", "view_depth", "view_pose", "view_intrinsics"))
    pointwise = views.view_regions("pointwise", rgb, depth, pose, K, CFG)
    assert pointwise.max() + 1 == (depth > 0).sum()
    stride1 = views.view_regions("shape_detection", rgb[:40, :40], depth[:40, :40], pose, K,
                                 PartitionConfig(view_stride=1))
    assert ((stride1 >= 0) == (depth[:40, :40] > 0)).all()
    empty = views.view_regions("shape_detection", rgb, np.zeros_like(depth), pose, K, CFG)
    assert (empty == NO_REGION).all()  # nothing valid: documented fallback, no error
    with pytest.raises(PartitionError, match=r"scene s9 view 0: view has zero area \(0x160"):
        views.view_regions("vccs", rgb[:0], depth[:0], pose, K, CFG, name="scene s9 view 0")
    with pytest.raises(PartitionError, match=r"scene s9 view 1: view_intrinsics: .*invertible"):
        views.view_regions("vccs", rgb, depth, pose, np.zeros((3, 3)), CFG, name="scene s9 view 1")
    # A frame without a valid pose (ScanNet marks them -inf): the gt oracle cannot match its
    # pixels to the scene's points, so it leaves the view without regions.
    lost = dict(scene, view_pose=np.full_like(scene["view_pose"], -np.inf))
    assert (job.partition_scene(lost, ["gt"], CFG)["view_region_gt"] == NO_REGION).all()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [m for m in UNSUPERVISED if m != "pointwise"])
def test_fewer_points_than_k_is_a_clear_error(method):
    coord = np.random.default_rng(0).random((12, 3)).astype(np.float32)
    with pytest.raises(PartitionError, match=r"scene tiny: 12 distinct points .* partition.knn=12"):
        partition_points(method, coord, None, None, CFG, name="scene tiny")
    assert (partition_points("pointwise", coord, None, None, CFG) == np.arange(12)).all()


@pytest.mark.parametrize("method", UNSUPERVISED)
def test_nan_coordinates_name_the_scene(method):
    coord, color = small_room()
    coord[5, 1] = np.nan
    with pytest.raises(PartitionError, match=r"scene bad_0: coord: 1 of \d+ points have NaN"):
        partition_points(method, coord, color, None, CFG, name="scene bad_0")


def test_nan_coordinates_fail_the_scene_for_gt_too():
    scene = {"scene_id": "bad_1", "coord": np.array([[0, 0, np.nan]] * 3, np.float32),
             "instance": np.zeros(3, np.int32)}
    with pytest.raises(PartitionError, match="scene bad_1: coord"):
        job.partition_scene(scene, ["gt"], CFG)


@pytest.mark.parametrize("method", ["shape_detection", "vccs", "region_growing"])
def test_duplicate_points_share_their_region(method):
    coord, truth = two_planes()
    dup = np.concatenate([coord, coord[::3], coord[::3]])
    region = partition_points(method, dup, None, None, CFG)
    n = len(coord)
    np.testing.assert_array_equal(region[n:n + len(coord[::3])], region[:n][::3])
    np.testing.assert_array_equal(region[n + len(coord[::3]):], region[:n][::3])
    np.testing.assert_array_equal(region[:n], partition_points(method, coord, None, None, CFG))


def test_zero_area_views_in_a_scene_name_the_scene():
    coord, color = small_room()
    scene = {"scene_id": "flat", "coord": coord, "color": color,
             "view_depth": np.zeros((2, 0, 5), np.float32), "view_pose": np.tile(np.eye(4), (2, 1, 1)),
             "view_intrinsics": np.tile(np.eye(3), (2, 1, 1))}
    with pytest.raises(PartitionError, match=r"scene flat: view_depth: views have zero area"):
        job.partition_scene(scene, ["shape_detection"], CFG)


def test_unknown_method_and_gt_through_the_unsupervised_entry_point():
    coord, color = small_room()
    with pytest.raises(PartitionError, match="unknown partition method 'kmeans'"):
        partition_points("kmeans", coord, color, None, CFG)
    with pytest.raises(PartitionError, match="oracle"):
        partition_points("gt", coord, color, None, CFG)


def test_demo_partition_keeps_furniture_out_of_walls_and_floors():
    """The synthetic configs sample 100 points/m^2, so shape detection's minimum region size must
    scale down from its 2 cm default (50 points): at 50, a chair seat or a sink is too small to
    stay a region and dissolves into the wall or floor next to it, so region pooling (RPC and
    the final pseudo-labels) overwrites it with the wrong class."""
    exp = cfgmod.load(REPO / "experiments" / "synthetic-demo.toml")
    names = synthetic.class_names(exp.config.synthetic.profile)
    flat = [names.index(n) for n in ("wall", "floor", "door", "window", "picture", "curtain",
                                     "shower curtain")]   # coplanar with a wall or floor

    def furniture_in_own_majority_region(pcfg: PartitionConfig) -> float:
        own = total = 0
        for index in range(6):
            scene = synthetic.generate_scene(exp.config.synthetic, index)
            region = partition_points("shape_detection", scene["coord"], scene["color"],
                                      scene["normal"], pcfg)
            label = scene["label"].astype(np.int64)
            pred = quality.oracle_prediction(region, label, len(names))
            furniture = (label != IGNORE_LABEL) & ~np.isin(label, flat)
            own += int((pred[furniture] == label[furniture]).sum())
            total += int(furniture.sum())
        assert total > 1000
        return own / total

    demo = furniture_in_own_majority_region(exp.config.partition)
    default = furniture_in_own_majority_region(PartitionConfig())
    assert exp.config.partition.sd_min_size < PartitionConfig().sd_min_size
    assert demo >= 0.8, demo
    assert default < demo - 0.1, (default, demo)


def test_area_per_point_measures_the_sampling_density():
    plane = grid(60, 60, 0.02, (0, 0, 0), (1, 0, 0), (0, 1, 0))  # 2500 points/m^2
    assert geometry.area_per_point(plane) == pytest.approx(0.02 ** 2, rel=0.1)
    rng = np.random.default_rng(0)
    uniform = np.c_[rng.uniform(0, 3, 9000), rng.uniform(0, 3, 9000), np.zeros(9000)]  # 1000 / m^2
    assert geometry.area_per_point(uniform) == pytest.approx(1e-3, rel=0.1)
    doubled = np.concatenate([plane, plane])  # exact duplicates count once
    assert area_per_point(doubled, CFG) == pytest.approx(geometry.area_per_point(plane))
    assert area_per_point(plane[:CFG.knn], CFG) is None


def test_min_size_warning_names_the_key_the_density_and_a_value():
    demo = cfgmod.load(REPO / "experiments" / "synthetic-demo.toml").config
    per_point = [area_per_point(synthetic.generate_scene(demo.synthetic, i)["coord"], CFG) for i in range(3)]
    assert all(1 / 150 < p < 1 / 80 for p in per_point), per_point  # the configs' 100 points/m^2
    warning = min_size_warning("shape_detection", per_point, CFG)
    assert warning is not None
    assert "partition.sd_min_size = 50 points covers 0.4" in warning
    assert "over 0.05 m^2 in 3 of 3 scenes" in warning
    assert "set partition.sd_min_size = 2" in warning
    assert "partition.rg_min_size = 50" in min_size_warning("region_growing", per_point, CFG)
    assert min_size_warning("shape_detection", per_point, demo.partition) is None  # 5 points: 0.04 m^2
    assert min_size_warning("shape_detection", [0.02 ** 2] * 3, CFG) is None  # a 2 cm scan
    # A real ScanNet scene (vh_clean_2 mesh, 566 vertices/m^2): 50 points cover 0.088 m^2, which
    # cost 10 points of oracle mIoU there; 11 points (0.019 m^2) did not.
    real = min_size_warning("shape_detection", [1 / 566] * 3, CFG)
    assert real is not None and "covers 0.09 m^2" in real and "set partition.sd_min_size = 11" in real
    assert min_size_warning("vccs", per_point, CFG) is None  # no minimum size
    assert min_size_warning("shape_detection", [], CFG) is None
