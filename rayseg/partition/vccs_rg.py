"""VCCS + region growing: region growing over the supervoxel adjacency graph (Table 4 "VCCS+RG").

Exact semantics: VCCS supervoxels (rayseg.partition.vccs) are the nodes; two supervoxels are
adjacent when a kNN edge joins their points. A supervoxel's normal and curvature come from the
least-squares plane of its points (curvature = l0 / (l0 + l1 + l2) of their covariance; a
supervoxel of at most ``knn`` points takes its mean point normal and counts as not smooth). The
region growing of rayseg.partition.region_growing (steps 1-4: ``rg_smoothness_deg``,
``rg_curvature_threshold``) then runs on that graph. Supervoxels are the atoms, so there is no
minimum size: a supervoxel that merges with nothing stays its own region and every point has a
region.
"""

from __future__ import annotations

import numpy as np

from rayseg.config import PartitionConfig
from rayseg.partition import geometry, vccs
from rayseg.partition.region_growing import grow_smooth_regions

PARAMS = vccs.PARAMS + ("rg_smoothness_deg", "rg_curvature_threshold")


def partition(coord: np.ndarray, color: np.ndarray, normal: np.ndarray | None,
              cfg: PartitionConfig) -> np.ndarray:
    """Region ids (N,) int32, every point labelled. Expects distinct, finite points (use
    rayseg.partition.partition_points for raw input)."""
    sv, knn, point_normal = vccs.supervoxels(coord, color, normal, cfg)
    num = int(sv.max()) + 1
    mom = geometry.Moments(coord, sv, num, coord.astype(np.float64).mean(axis=0))
    _, sv_normal, _, sv_curvature = geometry.plane_from_moments(mom.count, mom.s1, mom.s2)
    # A stable plane fit needs more than k points: smaller supervoxels take their mean point
    # normal and never grow (they only attach to a neighbour).
    tiny = mom.count <= cfg.knn
    if tiny.any():
        sv_normal[tiny] = geometry.mean_axis(point_normal, sv, num)[tiny]
        sv_curvature[tiny] = 1.0
    src, dst = geometry.knn_edges(knn)
    a, b = sv[src], sv[dst]
    cross = a != b
    edge = geometry.unique_sorted(np.minimum(a, b)[cross] * num + np.maximum(a, b)[cross])
    region = grow_smooth_regions(sv_normal, sv_curvature, edge // num, edge % num,
                                 cfg.rg_smoothness_deg, cfg.rg_curvature_threshold)
    return geometry.dense_labels(region[sv])
