"""Planar shape detection by region growing (the paper's default partition, as in WyPR: CGAL's
region growing of planes with a least-squares plane fit, then every leftover point joins its
nearest region). Vectorised as parallel seeded growth followed by coplanar merging.

Exact semantics (d = ``sd_max_distance``, a = ``sd_max_angle_deg``, k = ``knn``):

1. *Local geometry*: the k-nearest-neighbour graph, PCA normals (given unit normals are kept)
   and PCA curvature (rayseg.partition.geometry).
2. *Seeding*: the points still unassigned are binned into cubes of ``sd_seed_spacing``; in each
   cube the unassigned point of lowest curvature (ties: lowest index) seeds a region whose
   plane is its own tangent plane.
3. *Growth* (all regions at once, one kNN hop per round, as CGAL grows one region): an
   unassigned kNN neighbour q of a point added in the previous round joins that point's region
   R when dist(q, plane(R)) <= d and angle(normal(q), normal(R)) <= a (|dot|, orientation
   free). A point claimed by several regions in the same round joins the one whose plane is
   nearest (ties: lowest region id). After each round the plane of every region with more than
   k points is refit by least squares (from running moments); smaller regions keep the seed's
   plane. Growth stops when a round adds nothing; steps 2-3 repeat (up to
   ``SEEDING_ROUNDS`` times) on the points still unassigned, which picks up small planes that
   no seed of the first round reached.
4. *Coplanar merging*: two regions joined by a kNN edge merge when the least-squares plane of
   their union has an RMS point distance <= d / 2 (an even spread of points within d of a plane
   has RMS d / sqrt(3); half of d keeps merged regions clearly planar) and, when both have more
   than k points, their plane normals are within a. Merging runs in rounds: every region
   proposes its compatible neighbour of lowest union RMS (ties: lowest id); each connected
   group of proposals merges at once if the group's own least-squares plane passes the same
   tests (RMS <= d / 2, normal of every member of more than k points within a), otherwise
   only its mutually-proposed pairs merge (the globally best pair is always one, so every
   round merges). Every test is on the merged set's own plane, so no chain of merges can bend
   a region around a curved surface; the seeds of one plane end as one region.
5. A region whose points are collinear (standard deviation across its main axis <= d: a row
   of points along an edge fits every plane through it, so it is no planar primitive) and
   regions of fewer than ``sd_min_size`` points are dissolved; then every point without a
   region joins the region of its nearest (Euclidean) point that has one. Only a scene with no
   region of ``sd_min_size`` points at all is left entirely NO_REGION.
"""

from __future__ import annotations

import numpy as np

from rayseg.config import PartitionConfig
from rayseg.partition import geometry

PARAMS = ("knn", "sd_max_distance", "sd_max_angle_deg", "sd_min_size", "sd_seed_spacing")
SEEDING_ROUNDS = 3


def _seed_points(x: np.ndarray, curvature: np.ndarray, candidates: np.ndarray,
                 spacing: float) -> np.ndarray:
    """Lowest-curvature candidate of each occupied cube of edge ``spacing``."""
    cell = np.floor(x[candidates] / spacing).astype(np.int64)
    cell -= cell.min(axis=0)
    dims = cell.max(axis=0) + 1
    key = (cell[:, 0] * dims[1] + cell[:, 1]) * dims[2] + cell[:, 2]
    order = np.lexsort((candidates, curvature[candidates], key))
    key = key[order]
    first = np.ones(key.size, bool)
    first[1:] = key[1:] != key[:-1]
    return np.sort(candidates[order[first]])


def grow_planes(coord: np.ndarray, normal: np.ndarray, curvature: np.ndarray, knn: np.ndarray,
                max_distance: float, max_angle_deg: float, seed_spacing: float) -> np.ndarray:
    """Steps 2-3 of the module doc: region id (int64, -1 = unassigned) of each point."""
    n, k = knn.shape
    cos_limit = np.cos(np.deg2rad(max_angle_deg))
    x = coord.astype(np.float64) - coord.astype(np.float64).mean(axis=0)
    label = np.full(n, -1, np.int64)
    # Per-region state, indexed by region id: plane, running moments of the members.
    centroid, plane_n = np.zeros((0, 3)), np.zeros((0, 3))
    count, s1, s2 = np.zeros(0), np.zeros((0, 3)), np.zeros((0, 3, 3))
    for _ in range(SEEDING_ROUNDS):
        candidates = np.nonzero(label < 0)[0]
        if candidates.size == 0:
            break
        seeds = _seed_points(x, curvature, candidates, seed_spacing)
        label[seeds] = np.arange(count.size, count.size + seeds.size)
        xs = x[seeds]
        centroid = np.concatenate([centroid, xs])
        plane_n = np.concatenate([plane_n, normal[seeds]])
        count = np.concatenate([count, np.ones(seeds.size)])
        s1 = np.concatenate([s1, xs])
        s2 = np.concatenate([s2, xs[:, :, None] * xs[:, None, :]])
        frontier = seeds
        while frontier.size:
            region = np.repeat(label[frontier], k)
            cand = knn[frontier].reshape(-1)
            free = label[cand] < 0
            region, cand = region[free], cand[free]
            dist = np.abs(np.einsum("ij,ij->i", x[cand] - centroid[region], plane_n[region]))
            cosang = np.abs(np.einsum("ij,ij->i", normal[cand], plane_n[region]))
            ok = (dist <= max_distance) & (cosang >= cos_limit)
            region, cand, dist = region[ok], cand[ok], dist[ok]
            if cand.size == 0:
                break
            order = np.lexsort((region, dist, cand))
            cand, region = cand[order], region[order]
            first = np.ones(cand.size, bool)
            first[1:] = cand[1:] != cand[:-1]
            cand, region = cand[first], region[first]
            label[cand] = region
            # Running moments of the regions that grew, then least-squares refits.
            changed, inv, _ = geometry.group_ids(region)
            xc = x[cand]
            count[changed] += np.bincount(inv, minlength=changed.size)
            for a in range(3):
                s1[changed, a] += np.bincount(inv, xc[:, a], changed.size)
                for b in range(a, 3):
                    s2[changed, a, b] += np.bincount(inv, xc[:, a] * xc[:, b], changed.size)
                    s2[changed, b, a] = s2[changed, a, b]
            fit = changed[count[changed] > k]
            if fit.size:
                centroid[fit], plane_n[fit], _, _ = geometry.plane_from_moments(count[fit], s1[fit], s2[fit])
            frontier = cand
    return label


def merge_coplanar(coord: np.ndarray, label: np.ndarray, knn: np.ndarray, max_distance: float,
                   max_angle_deg: float) -> np.ndarray:
    """Step 4 of the module doc: labels after merging adjacent coplanar regions."""
    valid = label >= 0
    if not valid.any():
        return label
    k = knn.shape[1]
    cos_limit = np.cos(np.deg2rad(max_angle_deg))
    num = int(label.max()) + 1
    origin = coord.astype(np.float64).mean(axis=0)
    mom = geometry.Moments(coord[valid], label[valid], num, origin)
    count, s1, s2 = mom.count, mom.s1, mom.s2
    src, dst = geometry.knn_edges(knn)
    ls, ld = label[src], label[dst]
    cross = (ls >= 0) & (ld >= 0) & (ls != ld)
    pairs = geometry.unique_sorted(np.minimum(ls, ld)[cross] * num + np.maximum(ls, ld)[cross])
    root = np.arange(num)
    while pairs.size:
        a, b = pairs // num, pairs % num
        ids = geometry.unique_sorted(np.concatenate([a, b]))
        _, own, _, _ = geometry.plane_from_moments(count[ids], s1[ids], s2[ids])
        own_n = np.zeros((num, 3))
        own_n[ids] = own
        _, _, rms, _ = geometry.plane_from_moments(count[a] + count[b], s1[a] + s1[b], s2[a] + s2[b])
        big = (count[a] > k) & (count[b] > k)
        parallel = np.abs(np.einsum("ij,ij->i", own_n[a], own_n[b])) >= cos_limit
        ok = (rms <= max_distance / 2) & (parallel | ~big)
        if not ok.any():
            break
        a, b, rms = a[ok], b[ok], rms[ok]
        # Each region's best partner: lowest union RMS, ties to the lowest partner id.
        me = np.concatenate([a, b])
        other = np.concatenate([b, a])
        score = np.concatenate([rms, rms])
        order = np.lexsort((other, score, me))
        me, other = me[order], other[order]
        first = np.ones(me.size, bool)
        first[1:] = me[1:] != me[:-1]
        best = np.full(num, -1)
        best[me[first]] = other[first]
        # Groups of proposals merge at once when the group's own plane passes both tests;
        # otherwise only their mutual pairs merge (the globally best pair always is one).
        proposer = np.nonzero(best >= 0)[0]
        group = geometry.components(num, proposer, best[proposer])
        involved = np.zeros(num, bool)
        involved[proposer] = involved[best[proposer]] = True
        members = np.nonzero(involved)[0]
        gid, ginv, _ = geometry.group_ids(group[members])
        gcount = np.bincount(ginv, count[members], gid.size)
        gs1 = np.stack([np.bincount(ginv, s1[members, i], gid.size) for i in range(3)], axis=1)
        gs2 = np.zeros((gid.size, 3, 3))
        for i in range(3):
            for j in range(3):
                gs2[:, i, j] = np.bincount(ginv, s2[members, i, j], gid.size)
        _, g_n, g_rms, _ = geometry.plane_from_moments(gcount, gs1, gs2)
        tilted = (count[members] > k) & (np.abs(np.einsum("ij,ij->i", own_n[members], g_n[ginv])) < cos_limit)
        g_ok = (g_rms <= max_distance / 2) & (np.bincount(ginv, tilted, gid.size) == 0)
        whole = np.zeros(num, bool)
        whole[members] = g_ok[ginv]
        mutual = (best[a] == b) & (best[b] == a)
        joined = whole[a] & (best[a] == b) | whole[b] & (best[b] == a) | mutual
        if not joined.any():
            break  # cannot happen (the globally best pair is mutual), kept as a guard
        link = geometry.components(num, a[joined], b[joined])
        lowest = np.full(num, num)
        np.minimum.at(lowest, link, np.arange(num))
        new_id = lowest[link]  # every merged set takes its lowest region id
        moved = np.nonzero(new_id != np.arange(num))[0]
        np.add.at(count, new_id[moved], count[moved])
        np.add.at(s1, new_id[moved], s1[moved])
        np.add.at(s2, new_id[moved], s2[moved])
        count[moved] = 0
        root = new_id[root]
        pa, pb = new_id[pairs // num], new_id[pairs % num]
        differ = pa != pb
        pairs = geometry.unique_sorted(np.minimum(pa, pb)[differ] * num + np.maximum(pa, pb)[differ])
    out = label.copy()
    out[valid] = root[label[valid]]
    return out


def drop_lines(coord: np.ndarray, label: np.ndarray, max_distance: float) -> np.ndarray:
    """Step 5a: regions whose points are collinear within max_distance become unassigned."""
    valid = label >= 0
    if not valid.any():
        return label
    num = int(label.max()) + 1
    mom = geometry.Moments(coord[valid], label[valid], num, coord.astype(np.float64).mean(axis=0))
    line = geometry.principal_spreads(mom.count, mom.s1, mom.s2)[:, 1] <= max_distance
    out = label.copy()
    out[valid & line[np.maximum(label, 0)]] = -1
    return out


def partition(coord: np.ndarray, color: np.ndarray, normal: np.ndarray | None,
              cfg: PartitionConfig) -> np.ndarray:
    """Region ids (N,) int32 (every point labelled unless no plane was found). Expects distinct,
    finite points (use rayseg.partition.partition_points for raw input)."""
    knn, normal, curvature = geometry.local_geometry(coord, normal, cfg.knn)
    label = grow_planes(coord, normal, curvature, knn, cfg.sd_max_distance,
                        cfg.sd_max_angle_deg, cfg.sd_seed_spacing)
    label = merge_coplanar(coord, label, knn, cfg.sd_max_distance, cfg.sd_max_angle_deg)
    label = drop_lines(coord, geometry.dense_labels(label), cfg.sd_max_distance)
    label = geometry.remove_small(label, cfg.sd_min_size)
    return geometry.dense_labels(geometry.fill_nearest(coord, label))
