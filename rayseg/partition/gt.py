"""The ground-truth oracle partition (Table 4's "GT" row): regions = GT instances.

ORACLE ONLY. It reads the scene's ``instance`` column, which is evaluation-only ground truth,
so its regions must never feed an unsupervised result: every output of rayseg that carries it
is flagged (the column is ``region_gt``, the job and quality table print "ORACLE", the MLflow
run is tagged ``partition.oracle=true``). It is therefore not in the METHODS dict of
unsupervised algorithms and has its own signature.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from rayseg.data.scene import NO_REGION
from rayseg.partition import geometry

PARAMS = ("gt_view_tolerance",)
ORACLE_NOTE = "ORACLE: ground-truth instances, not an unsupervised partition"


def partition(instance: np.ndarray) -> np.ndarray:
    """Region ids (N,) int32: GT instance ids made dense; instance -1 -> NO_REGION."""
    instance = np.asarray(instance)
    if instance.ndim != 1:
        raise geometry.PartitionError(f"gt: instance: expected shape (N,), got {instance.shape}")
    return geometry.dense_labels(instance.astype(np.int64))


def view_partition(world: np.ndarray, valid: np.ndarray, coord: np.ndarray,
                   region: np.ndarray, tolerance: float) -> np.ndarray:
    """Pixel regions of one view for the oracle: the gt region of the nearest scene point
    within ``tolerance`` metres of the back-projected pixel, else NO_REGION.

    world: (H, W, 3) back-projected pixels; valid: (H, W) bool; coord/region: the scene's
    points and their gt regions."""
    out = np.full(valid.shape, NO_REGION, np.int32)
    if not valid.any() or coord.shape[0] == 0:
        return out
    dist, idx = cKDTree(coord).query(world[valid], k=1, distance_upper_bound=tolerance)
    hit = np.isfinite(dist)
    vals = np.full(dist.shape, NO_REGION, np.int32)
    vals[hit] = region[idx[hit]]
    out[valid] = vals
    return out
