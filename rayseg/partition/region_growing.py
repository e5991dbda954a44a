"""Region growing on normals and curvature (Rabbani et al. 2006, as in PCL's RegionGrowing,
after Adams & Bischof's seeded region growing), vectorised as connected components.

Exact semantics (``grow_smooth_regions``, shared with vccs_rg, which runs it on supervoxels):

1. a node is *smooth* when its curvature is <= ``rg_curvature_threshold``;
2. an edge of the symmetrised kNN graph is *accepted* when the angle between its two normals
   (compared with |dot|, so orientation does not matter) is <= ``rg_smoothness_deg``;
3. regions are the connected components of the smooth nodes over accepted edges (PCL grows a
   region from a seed, adds every neighbour passing the angle test and continues only from
   smooth ones; between two smooth points that is exactly connectivity, but order-free);
4. a non-smooth node joins the region of the accepted smooth neighbour whose normal is closest
   to its own (PCL adds such points without growing from them); a non-smooth node with no such
   neighbour is left alone (its own one-node region);
5. regions of fewer than ``rg_min_size`` points are dissolved: their points get NO_REGION.

So, like PCL, ``region_growing`` leaves points NO_REGION (high-curvature clutter, small
fragments); the RPC module treats such points as their own region.
"""

from __future__ import annotations

import numpy as np

from rayseg.config import PartitionConfig
from rayseg.data.scene import NO_REGION
from rayseg.partition import geometry

PARAMS = ("knn", "rg_smoothness_deg", "rg_curvature_threshold", "rg_min_size")


def grow_smooth_regions(normal: np.ndarray, curvature: np.ndarray, src: np.ndarray,
                        dst: np.ndarray, smoothness_deg: float, curvature_threshold: float
                        ) -> np.ndarray:
    """Region id (int64, not dense) of each node of a graph; steps 1-4 of the module doc.

    ``src``/``dst`` are edges in either or both directions; every node gets an id."""
    n = normal.shape[0]
    cos_limit = np.cos(np.deg2rad(smoothness_deg))
    similarity = np.abs(np.einsum("ij,ij->i", normal[src], normal[dst]))
    accepted = similarity >= cos_limit
    smooth = curvature <= curvature_threshold
    both = accepted & smooth[src] & smooth[dst]
    comp = geometry.components(n, src[both], dst[both])
    region = np.where(smooth, comp, -1)

    # Non-smooth nodes: the best accepted smooth neighbour, looking along both edge directions.
    a = np.concatenate([src, dst])
    b = np.concatenate([dst, src])
    sim = np.concatenate([similarity, similarity])
    attach = np.concatenate([accepted, accepted]) & ~smooth[a] & smooth[b]
    a, b, sim = a[attach], b[attach], sim[attach]
    if a.size:
        order = np.lexsort((b, -sim, a))  # per node a: most similar first, then lowest index
        a, b = a[order], b[order]
        first = np.ones(a.size, bool)
        first[1:] = a[1:] != a[:-1]
        region[a[first]] = comp[b[first]]
    alone = region < 0
    region[alone] = n + np.nonzero(alone)[0]  # ids beyond every component id
    return region


def partition(coord: np.ndarray, color: np.ndarray, normal: np.ndarray | None,
              cfg: PartitionConfig) -> np.ndarray:
    """Region ids (N,) int32, NO_REGION for dissolved points. Expects distinct, finite points
    (use rayseg.partition.partition_points for raw input)."""
    knn, normal, curvature = geometry.local_geometry(coord, normal, cfg.knn)
    src, dst = geometry.knn_edges(knn)
    region = grow_smooth_regions(normal, curvature, src, dst, cfg.rg_smoothness_deg,
                                 cfg.rg_curvature_threshold)
    region = geometry.dense_labels(region)
    return geometry.dense_labels(geometry.remove_small(region, cfg.rg_min_size))


__all__ = ["partition", "grow_smooth_regions", "PARAMS", "NO_REGION"]
