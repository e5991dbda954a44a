"""Voxel Cloud Connectivity Segmentation supervoxels (Papon et al., CVPR 2013), vectorised.

Exact semantics (r_v = ``vccs_voxel_resolution``, r_s = ``vccs_seed_resolution``):

1. *Voxels*: points are binned into cubes of edge r_v; a voxel's features are the mean
   position, mean colour and the sign-free mean of its points' normals (geometry.mean_axis);
   given unit normals are used, unknown ones estimated by PCA over ``knn`` neighbours.
2. *Adjacency*: two voxels are adjacent when a kNN edge joins points of both. (The paper uses
   the 26-neighbourhood of the voxel grid; kNN adjacency is the same on densely sampled
   surfaces and keeps sparsely sampled ones connected at any r_v.)
3. *Seeds*: voxels are binned into cubes of edge r_s; in each, the voxel nearest to the mean
   position of that cube's voxels is a seed (the paper takes the voxel nearest to the seed-grid
   point, which may lie off the surface).
4. *Distance* of voxel v to supervoxel s (its current mean features, sign-free mean normal):
   D = w_c * |rgb_v - rgb_s| / (255 sqrt 3) + w_s * |xyz_v - xyz_s| / r_s
       + w_n * (1 - |n_v . n_s|)
   with w_c, w_s, w_n = ``vccs_color_weight``, ``vccs_spatial_weight``, ``vccs_normal_weight``.
5. *Flow-constrained clustering*, in rounds: a voxel that joined a supervoxel in the previous
   round (at first, the seeds) offers that supervoxel to its adjacent voxels; a voxel takes
   the offer of lowest D if it is unassigned or D is below its distance to its current
   supervoxel (ties: lowest supervoxel id). Supervoxel means are recomputed every round.
   Rounds stop when nothing changes, after at most 2 * r_s / r_v + 2.
6. *Connectivity*: a steal can cut a supervoxel; only its largest connected piece stays, the
   voxels of the other pieces are re-claimed by adjacent supervoxels (rounds as in 5, without
   stealing, until nothing changes). Voxels no seed reached form one supervoxel per connected
   group. Every point gets the supervoxel of its voxel, so every point has a region.
"""

from __future__ import annotations

import numpy as np

from scipy.spatial import cKDTree

from rayseg.config import PartitionConfig
from rayseg.partition import geometry

PARAMS = ("knn", "vccs_voxel_resolution", "vccs_seed_resolution", "vccs_color_weight",
          "vccs_spatial_weight", "vccs_normal_weight")


def _cells(x: np.ndarray, size: float) -> np.ndarray:
    """Dense cell id (int64) of each row of x for a grid of cubes of edge ``size``."""
    cell = np.floor(x / size).astype(np.int64)
    cell -= cell.min(axis=0)
    dims = cell.max(axis=0) + 1
    key = (cell[:, 0] * dims[1] + cell[:, 1]) * dims[2] + cell[:, 2]
    return geometry.group_ids(key)[1]


def _mean(values: np.ndarray, group: np.ndarray, count: np.ndarray) -> np.ndarray:
    num = count.size
    return np.stack([np.bincount(group, values[:, a], num) for a in range(values.shape[1])],
                    axis=1) / np.maximum(count, 1)[:, None]


def _spread_seeds(xyz: np.ndarray, seeds: np.ndarray, min_gap: float) -> np.ndarray:
    """Drop seeds closer than min_gap to an earlier kept seed (a surface that crosses a seed
    cube boundary would otherwise get two seeds side by side)."""
    pairs = cKDTree(xyz[seeds]).query_pairs(min_gap, output_type="ndarray")
    if pairs.size == 0:
        return seeds
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    keep = np.ones(seeds.size, bool)
    for i, j in pairs:  # greedy in seed order; one pass over the (few) close pairs
        if keep[i]:
            keep[j] = False
    return seeds[keep]


def supervoxels(coord: np.ndarray, color: np.ndarray, normal: np.ndarray | None,
                cfg: PartitionConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(supervoxel id per point (N,) int64 dense, knn (N, k), unit normals (N, 3),
    PCA curvature (N,)). The point geometry is returned for vccs_rg, which reuses it."""
    knn, normal, curvature = geometry.local_geometry(coord, normal, cfg.knn)
    x = coord.astype(np.float64) - coord.astype(np.float64).mean(axis=0)
    voxel = _cells(x, cfg.vccs_voxel_resolution)
    nv = int(voxel.max()) + 1
    vcount = np.bincount(voxel, minlength=nv).astype(np.float64)
    vxyz = _mean(x, voxel, vcount)
    vrgb = _mean(color.astype(np.float64), voxel, vcount)
    vnormal = geometry.mean_axis(normal.astype(np.float64), voxel, nv)

    src, dst = geometry.knn_edges(knn)
    vs, vd = voxel[src], voxel[dst]
    cross = vs != vd
    edge = geometry.unique_sorted(np.minimum(vs, vd)[cross] * nv + np.maximum(vs, vd)[cross])
    ea, eb = edge // nv, edge % nv
    graph = geometry.Adjacency(np.concatenate([ea, eb]), np.concatenate([eb, ea]), nv)
    ea, eb = graph.src, graph.dst  # both directions, grouped by source voxel

    # Seeds: per seed cube, the voxel nearest to the mean position of the cube's voxels.
    seed_cell = _cells(vxyz, cfg.vccs_seed_resolution)
    ns = int(seed_cell.max()) + 1
    cell_mean = _mean(vxyz, seed_cell, np.bincount(seed_cell, minlength=ns).astype(np.float64))
    gap = np.linalg.norm(vxyz - cell_mean[seed_cell], axis=1)
    order = np.lexsort((np.arange(nv), gap, seed_cell))
    first = np.ones(nv, bool)
    first[1:] = seed_cell[order][1:] != seed_cell[order][:-1]
    seeds = _spread_seeds(vxyz, np.sort(order[first]), cfg.vccs_seed_resolution / 2)

    owner = np.full(nv, -1, np.int64)
    owner[seeds] = np.arange(seeds.size)
    nsv = seeds.size
    w_c, w_s, w_n = cfg.vccs_color_weight, cfg.vccs_spatial_weight, cfg.vccs_normal_weight

    def distance(v: np.ndarray, s: np.ndarray, sxyz, srgb, snormal) -> np.ndarray:
        dc, ds = vrgb[v] - srgb[s], vxyz[v] - sxyz[s]
        d_c = np.sqrt(np.einsum("ij,ij->i", dc, dc)) / (255.0 * np.sqrt(3.0))
        d_s = np.sqrt(np.einsum("ij,ij->i", ds, ds)) / cfg.vccs_seed_resolution
        d_n = 1.0 - np.abs(np.einsum("ij,ij->i", vnormal[v], snormal[s]))
        return w_c * d_c + w_s * d_s + w_n * d_n

    def expand(changed: np.ndarray, max_rounds: int, steal: bool) -> None:
        """Rounds of offers across edges leaving the voxels that changed owner last round."""
        for _ in range(max_rounds):
            assigned = owner >= 0
            scount = np.bincount(owner[assigned], minlength=nsv).astype(np.float64)
            members = np.nonzero(assigned)[0]
            sxyz = _mean(vxyz[members], owner[members], scount)
            srgb = _mean(vrgb[members], owner[members], scount)
            snormal = geometry.mean_axis(vnormal[members], owner[members], nsv, vnormal[seeds])
            e = graph.edges_from(changed[owner[changed] >= 0])
            src, dst = ea[e], eb[e]
            offer = owner[src] != owner[dst]
            if not steal:
                offer &= owner[dst] < 0
            target, s = dst[offer], owner[src[offer]]
            if target.size == 0:
                return
            d_new = distance(target, s, sxyz, srgb, snormal)
            current = owner[target]
            d_cur = np.full(target.size, np.inf)
            has = current >= 0
            d_cur[has] = distance(target[has], current[has], sxyz, srgb, snormal)
            better = d_new < d_cur
            target, s, d_new = target[better], s[better], d_new[better]
            if target.size == 0:
                return
            order = np.lexsort((s, d_new, target))
            target, s = target[order], s[order]
            first = np.ones(target.size, bool)
            first[1:] = target[1:] != target[:-1]
            owner[target[first]] = s[first]
            changed = target[first]

    expand(seeds, int(np.ceil(2 * cfg.vccs_seed_resolution / cfg.vccs_voxel_resolution)) + 2,
           steal=True)
    # Flow constraint: a steal can cut a supervoxel; only its largest connected piece stays,
    # the other pieces are re-claimed (without stealing) by adjacent supervoxels.
    same = (owner[ea] == owner[eb]) & (owner[ea] >= 0)
    piece = geometry.components(nv, ea[same], eb[same])
    assigned = np.nonzero(owner >= 0)[0]
    size = np.bincount(piece, minlength=nv)
    order = np.lexsort((piece[assigned], -size[piece[assigned]], owner[assigned]))
    sv_sorted = owner[assigned][order]
    first = np.ones(order.size, bool)
    first[1:] = sv_sorted[1:] != sv_sorted[:-1]
    keep_piece = np.zeros(nv, bool)
    keep_piece[piece[assigned][order][first]] = True
    owner[~keep_piece[piece]] = -1
    expand(np.nonzero(owner >= 0)[0], nv, steal=False)
    # Voxels no supervoxel reached: one supervoxel per connected group of them.
    free = owner < 0
    orphan = geometry.components(nv, ea[free[ea] & free[eb]], eb[free[ea] & free[eb]])
    label = np.where(free, nsv + orphan, owner)
    return geometry.dense_labels(label[voxel]).astype(np.int64), knn, normal, curvature


def partition(coord: np.ndarray, color: np.ndarray, normal: np.ndarray | None,
              cfg: PartitionConfig) -> np.ndarray:
    """Supervoxel ids (N,) int32, every point labelled. Expects distinct, finite points (use
    rayseg.partition.partition_points for raw input)."""
    label = supervoxels(coord, color, normal, cfg)[0]
    return label.astype(np.int32)
