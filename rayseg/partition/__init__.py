"""Unsupervised region partitions of points and pixels (Table 4), one module per algorithm.

Every method is ``fn(coord (N,3) f32, color (N,3) u8, normal (N,3) f32 or None,
cfg: PartitionConfig) -> (N,) int32`` region ids, dense 0..R-1, with NO_REGION (-1) only where
a module documents it (region_growing; shape_detection when no plane exists at all). The raw
functions in METHODS expect finite, distinct points; call ``partition_points``, which checks the
input (clear errors naming the scene) and handles exact duplicate points (one point for the
algorithm, same region for all copies).

``gt`` (GT instances, an ORACLE for Table 4's last row) is deliberately not in METHODS: it reads
evaluation-only ground truth and has its own signature (rayseg.partition.gt).

Shard columns: ``region_<method>`` (N,) and ``view_region_<method>`` (V, H, W), int32.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from rayseg.config import PartitionConfig
from rayseg.data.scene import NO_REGION
from rayseg.partition import geometry, gt, pointwise, region_growing, shape_detection, vccs, vccs_rg
from rayseg.partition.geometry import PartitionError, estimate_normals

# The unsupervised algorithms, by name (PartitionConfig.method).
METHODS = {
    "pointwise": pointwise.partition,
    "vccs": vccs.partition,
    "region_growing": region_growing.partition,
    "vccs_rg": vccs_rg.partition,
    "shape_detection": shape_detection.partition,
}
GT_METHOD = "gt"
ALL_METHODS = tuple(METHODS) + (GT_METHOD,)

# The PartitionConfig fields each method's result depends on (its resumability hash).
PARAMS = {
    "pointwise": pointwise.PARAMS,
    "vccs": vccs.PARAMS,
    "region_growing": region_growing.PARAMS,
    "vccs_rg": vccs_rg.PARAMS,
    "shape_detection": shape_detection.PARAMS,
    GT_METHOD: gt.PARAMS,
}
# The methods with a minimum region size, counted in points: smaller regions are dissolved into a
# neighbour (shape_detection) or left without a region (region_growing).
MIN_SIZE_KEYS = {"shape_detection": "sd_min_size", "region_growing": "rg_min_size"}
# A minimum size covering more surface than this also removes small objects (chair seats, sinks):
# the default 50 points cover about 0.02 m^2 of a 2 cm scan, but 0.09 m^2 of a ScanNet
# vh_clean_2 mesh (566 vertices/m^2) and 0.5 m^2 at 100 points/m^2. The threshold is a square
# of ~22 cm: half the side of a chair seat or a sink (~45 cm), so an object broken into a few
# primitives keeps them. Measured on either side of it: 0.09 m^2 cost a real ScanNet scene 10
# points of oracle mIoU (69.7 vs 79.8 at 0.02 m^2, 11 points); 0.04 m^2 (the synthetic configs'
# 5 points at ~115 points/m^2) gave 76.8 where 0.43 m^2 gave 58.9.
MIN_REGION_AREA_WARN_M2 = 0.05
REFERENCE_MIN_REGION_AREA_M2 = 0.02

# Bumped when an algorithm's output changes for the same parameters (invalidates stored columns).
ALGORITHM_VERSION = 2


def is_oracle(method: str) -> bool:
    """True for partitions built from ground truth (never an unsupervised result)."""
    return method == GT_METHOD


def check_method(method: str) -> None:
    if method not in ALL_METHODS:
        raise PartitionError(f"unknown partition method {method!r}; known: {', '.join(ALL_METHODS)}")


def method_params(method: str, cfg: PartitionConfig) -> dict:
    """The parameters a method's regions depend on (pixel stride included for 2D regions)."""
    check_method(method)
    names = PARAMS[method] + (("view_stride",) if method != GT_METHOD else ())
    return {"method": method, "algorithm_version": ALGORITHM_VERSION,
            **{name: getattr(cfg, name) for name in names}}


def params_hash(method: str, cfg: PartitionConfig) -> str:
    """Short stable hash of method_params (what makes a stored column reusable)."""
    text = json.dumps(method_params(method, cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def partition_points(method: str, coord: np.ndarray, color: np.ndarray | None,
                     normal: np.ndarray | None, cfg: PartitionConfig, name: str = "points"
                     ) -> np.ndarray:
    """Region ids (N,) int32 of ``method`` (a METHODS name) for one point set.

    Raises PartitionError naming ``name`` for NaN/inf coordinates, bad shapes, or fewer than
    ``cfg.knn + 1`` distinct points (pointwise needs none of that geometry and accepts any N>0).
    Exact duplicate points are partitioned once and share their region."""
    if method == GT_METHOD:
        raise PartitionError(f"{name}: 'gt' is the ground-truth oracle; use rayseg.partition.gt")
    check_method(method)
    coord, color, normal = geometry.check_points(coord, color, normal, name)
    if method == "pointwise":
        return METHODS[method](coord, color, normal, cfg)
    first, inverse = geometry.unique_points(coord)
    if first.size <= cfg.knn:
        raise PartitionError(
            f"{name}: {first.size} distinct points ({coord.shape[0]} in all), {method} needs more "
            f"than partition.knn={cfg.knn}")
    if first.size == coord.shape[0]:
        return METHODS[method](coord, color, normal, cfg)
    sub_normal = None if normal is None else normal[first]
    return METHODS[method](coord[first], color[first], sub_normal, cfg)[inverse]


def area_per_point(coord: np.ndarray, cfg: PartitionConfig) -> float | None:
    """Median surface area per distinct point of one scene, m^2 (None with too few points)."""
    coord = np.asarray(coord, np.float64)
    first, _ = geometry.unique_points(coord)
    return geometry.area_per_point(coord[first], cfg.knn) if first.size > cfg.knn else None


def min_size_warning(method: str, per_point: list[float], cfg: PartitionConfig) -> str | None:
    """One warning for a dataset (per_point: area_per_point of each scene) when the method's
    minimum region size covers more than MIN_REGION_AREA_WARN_M2 in the median scene, with the
    value that would cover REFERENCE_MIN_REGION_AREA_M2 instead. None when it does not."""
    key = MIN_SIZE_KEYS.get(method)
    if key is None or not per_point:
        return None
    min_size = getattr(cfg, key)
    typical = float(np.median(per_point))
    area = min_size * typical
    if area <= MIN_REGION_AREA_WARN_M2:
        return None
    over = sum(min_size * p > MIN_REGION_AREA_WARN_M2 for p in per_point)
    suggest = max(1, round(REFERENCE_MIN_REGION_AREA_M2 / typical))
    return (f"{method}: partition.{key} = {min_size} points covers {area:.2f} m^2 in the median scene "
            f"({1 / typical:.0f} points/m^2; over {MIN_REGION_AREA_WARN_M2} m^2 in {over} of "
            f"{len(per_point)} scenes), so small objects such as chair seats and sinks are dissolved "
            f"into the wall or floor next to them. For about {REFERENCE_MIN_REGION_AREA_M2} m^2 (50 "
            f"points of a 2 cm scan) set partition.{key} = {suggest}.")


__all__ = ["METHODS", "GT_METHOD", "ALL_METHODS", "PARAMS", "NO_REGION", "PartitionError",
           "partition_points", "method_params", "params_hash", "is_oracle", "estimate_normals",
           "MIN_SIZE_KEYS", "area_per_point", "min_size_warning"]
