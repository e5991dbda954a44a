"""VCCS + region growing: region growing over the supervoxel adjacency graph (Table 4 "VCCS+RG").

Exact semantics: VCCS supervoxels (rayseg.partition.vccs) are the nodes; two supervoxels are
adjacent when a kNN edge joins their points. A supervoxel's normal is the sign-free mean of its
points' normals and its curvature the mean of its points' PCA curvatures (both stay meaningful
for supervoxels of a few points, e.g. on sparsely sampled scenes, where a plane fit to the
supervoxel's own points would not). The region growing of rayseg.partition.region_growing
(steps 1-4: ``rg_smoothness_deg``, ``rg_curvature_threshold``) then runs on that graph.
Supervoxels are the atoms, so there is no minimum size: a supervoxel that merges with nothing
stays its own region and every point has a region.
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
    sv, knn, point_normal, point_curvature = vccs.supervoxels(coord, color, normal, cfg)
    num = int(sv.max()) + 1
    sv_normal = geometry.mean_axis(point_normal, sv, num)
    sv_curvature = np.bincount(sv, point_curvature, num) / np.bincount(sv, minlength=num)
    src, dst = geometry.knn_edges(knn)
    a, b = sv[src], sv[dst]
    cross = a != b
    edge = geometry.unique_sorted(np.minimum(a, b)[cross] * num + np.maximum(a, b)[cross])
    region = grow_smooth_regions(sv_normal, sv_curvature, edge // num, edge % num,
                                 cfg.rg_smoothness_deg, cfg.rg_curvature_threshold)
    return geometry.dense_labels(region[sv])
