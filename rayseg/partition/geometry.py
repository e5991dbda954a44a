"""Shared geometry for the partition methods: input checks, the kNN graph, PCA normals and
curvature, plane fits from moments, and small graph helpers (all vectorised numpy/scipy).

Conventions used by every method:

- the k-nearest-neighbour graph excludes the point itself: ``knn[i]`` holds the k nearest
  OTHER points of i (a cKDTree query of k + 1, first column dropped);
- PCA over the point and its k neighbours gives the normal (eigenvector of the smallest
  eigenvalue) and the curvature ``l0 / (l0 + l1 + l2)`` (surface variation, 0 on a plane,
  at most 1/3);
- normals are oriented towards a viewpoint (the scene centroid unless given: inside a room that
  points walls, floor and ceiling inwards; for a view, the camera centre). Every method
  compares normals with ``|dot|``, so partitions never depend on the orientation.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

from rayseg.data.scene import NO_REGION


PCA_CHUNK = 262_144  # points per PCA chunk (memory bound for multi-million-point rooms)


class PartitionError(ValueError):
    """The input of a partition cannot be partitioned; the message names the scene/view."""


def check_points(coord: np.ndarray, color: np.ndarray | None, normal: np.ndarray | None,
                 name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """coord/color/normal as contiguous float32/uint8/float32, or PartitionError naming ``name``."""
    coord = np.asarray(coord)
    if coord.ndim != 2 or coord.shape[1] != 3:
        raise PartitionError(f"{name}: coord: expected shape (N, 3), got {coord.shape}")
    n = coord.shape[0]
    if n == 0:
        raise PartitionError(f"{name}: coord: no points to partition")
    finite = np.isfinite(coord).all(axis=1)
    if not finite.all():
        raise PartitionError(f"{name}: coord: {int((~finite).sum())} of {n} points have NaN/inf "
                             "coordinates")
    if color is None:
        color = np.zeros((n, 3), np.uint8)
    color = np.asarray(color)
    if color.shape != (n, 3):
        raise PartitionError(f"{name}: color: expected shape ({n}, 3), got {color.shape}")
    if normal is not None:
        normal = np.asarray(normal)
        if normal.shape != (n, 3):
            raise PartitionError(f"{name}: normal: expected shape ({n}, 3), got {normal.shape}")
        normal = np.ascontiguousarray(normal, dtype=np.float32)
        if not np.isfinite(normal).all():
            raise PartitionError(f"{name}: normal: NaN/inf values")
    return (np.ascontiguousarray(coord, dtype=np.float32),
            np.ascontiguousarray(color, dtype=np.uint8), normal)


# numpy 2's np.unique without return_* flags hashes, which is ~15x slower than sorting on
# millions of distinct int64 keys; these two sort instead.
def unique_sorted(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a 1-D array."""
    s = np.sort(keys)
    keep = np.ones(s.size, bool)
    keep[1:] = s[1:] != s[:-1]
    return s[keep]


def group_ids(keys: np.ndarray, stable: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct sorted values, inverse: index of each key's value, first index of each value).

    ``first`` is the first occurrence only when ``stable`` (a stable sort, a little slower)."""
    order = np.argsort(keys, kind="stable" if stable else None)
    s = keys[order]
    start = np.ones(s.size, bool)
    start[1:] = s[1:] != s[:-1]
    inverse = np.empty(keys.size, np.int64)
    inverse[order] = np.cumsum(start) - 1
    return s[start], inverse, order[start]


def unique_points(coord: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first index of each distinct coordinate, inverse map point -> distinct index).

    Exact duplicates are one point for the partition (they get the same region)."""
    # + 0.0 turns -0.0 into 0.0, so equal coordinates also have equal bytes.
    rows = (np.ascontiguousarray(coord, dtype=np.float32) + np.float32(0)).view(np.dtype((np.void, 12))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # keep the original point order among distinct points
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return first[order], rank[inverse.ravel()]


def knn_graph(coord: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices (N, k) int64, distances (N, k) float32) of the k nearest other points.

    Expects distinct points (see unique_points) and N > k."""
    tree = cKDTree(coord)
    dist, idx = tree.query(coord, k=k + 1)
    return idx[:, 1:].astype(np.int64, copy=False), dist[:, 1:].astype(np.float32, copy=False)


def area_per_point(coord: np.ndarray, k: int = 12, max_queries: int = 20000) -> float:
    """Median surface area per point of a scanned surface, m^2: pi r_k^2 / k around each point,
    r_k = distance to its k-th nearest other point (a regular grid of spacing s gives ~1.05 s^2).
    At most max_queries evenly spaced points are queried (against all points).

    Expects distinct points and N > k."""
    step = max(1, len(coord) // max_queries)
    dist, _ = cKDTree(coord).query(coord[::step], k=k + 1)
    return float(np.median(np.pi * dist[:, -1] ** 2 / k))


def sym3_smallest(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues ascending (N, 3), unit eigenvector of the smallest (N, 3)) of symmetric 3x3
    matrices, in closed form (trigonometric solution of the characteristic cubic; the vector is
    the largest cross product of two rows of A - l0 I). ~2x faster than np.linalg.eigh on many
    small matrices. Degenerate cases (a row space of rank <= 1) get a vector orthogonal to the
    largest row."""
    a = cov.astype(np.float64, copy=False)
    a00, a11, a22 = a[:, 0, 0], a[:, 1, 1], a[:, 2, 2]
    a01, a02, a12 = a[:, 0, 1], a[:, 0, 2], a[:, 1, 2]
    q = (a00 + a11 + a22) / 3
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    p = np.sqrt((b00 ** 2 + b11 ** 2 + b22 ** 2 + 2 * (a01 ** 2 + a02 ** 2 + a12 ** 2)) / 6)
    spread = p > 1e-12 * np.maximum(np.abs(q), 1e-30)
    ps = np.where(spread, p, 1.0)
    det = (b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02)
           + a02 * (a01 * a12 - b11 * a02)) / ps ** 3
    phi = np.arccos(np.clip(det / 2, -1.0, 1.0)) / 3
    l_max = np.where(spread, q + 2 * p * np.cos(phi), q)
    l_min = np.where(spread, q + 2 * p * np.cos(phi + 2 * np.pi / 3), q)
    evals = np.stack([l_min, 3 * q - l_max - l_min, l_max], axis=1)
    m = a - l_min[:, None, None] * np.eye(3)
    crosses = np.stack([np.cross(m[:, 0], m[:, 1]), np.cross(m[:, 0], m[:, 2]),
                        np.cross(m[:, 1], m[:, 2])], axis=1)  # (N, 3 pairs, 3)
    norms = np.einsum("npi,npi->np", crosses, crosses)
    best = norms.argmax(axis=1)
    rows = np.arange(a.shape[0])
    vec, size = crosses[rows, best], np.sqrt(norms[rows, best])
    row_norms = np.einsum("nri,nri->nr", m, m)
    degenerate = size <= 1e-9 * np.maximum(row_norms.max(axis=1), 1e-300)
    if degenerate.any():
        big = m[np.nonzero(degenerate)[0], row_norms[degenerate].argmax(axis=1)]
        axis = np.eye(3)[np.abs(big).argmin(axis=1)]
        alt = np.cross(big, axis)
        alt[np.einsum("ij,ij->i", alt, alt) == 0] = (0.0, 0.0, 1.0)  # zero matrix: any unit vector
        vec[degenerate] = alt
        size = np.linalg.norm(vec, axis=1)
    return evals, vec / size[:, None]


def pca_normals(coord: np.ndarray, knn: np.ndarray,
                viewpoint: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(unit normals (N, 3) float32, curvature (N,) float32) by PCA over each point and its kNN."""
    n = coord.shape[0]
    evals = np.empty((n, 3))
    normal = np.empty((n, 3), np.float32)
    for lo in range(0, n, PCA_CHUNK):  # chunks bound the (chunk, k+1, 3) temporaries
        hi = min(lo + PCA_CHUNK, n)
        nb = np.concatenate([coord[lo:hi, None, :], coord[knn[lo:hi]]], axis=1)
        centred = nb - nb.mean(axis=1, keepdims=True)
        evals[lo:hi], normal[lo:hi] = sym3_smallest(np.einsum("nki,nkj->nij", centred, centred))
    total = evals.sum(axis=1)
    curvature = np.where(total > 0, evals[:, 0] / np.where(total > 0, total, 1), 0).astype(np.float32)
    return orient_normals(coord, normal, viewpoint), np.maximum(curvature, 0)


def orient_normals(coord: np.ndarray, normal: np.ndarray,
                   viewpoint: np.ndarray | None = None) -> np.ndarray:
    """Flip normals so that each points towards ``viewpoint`` (default: the centroid)."""
    vp = coord.mean(axis=0) if viewpoint is None else np.asarray(viewpoint, np.float32)
    flip = np.einsum("ij,ij->i", normal, vp - coord) < 0
    normal = normal.copy()
    normal[flip] *= -1
    return normal


def estimate_normals(coord: np.ndarray, k: int = 12,
                     viewpoint: np.ndarray | None = None) -> np.ndarray:
    """Unit normals (N, 3) float32 by PCA over k neighbours, oriented towards ``viewpoint``
    (default: the centroid). Duplicate points share their normal; needs more than k distinct
    points (else PartitionError)."""
    coord, _, _ = check_points(coord, None, None, "estimate_normals")
    first, inverse = unique_points(coord)
    if first.size <= k:
        raise PartitionError(f"estimate_normals: {first.size} distinct points, need more than k={k}")
    pts = coord[first]
    knn, _ = knn_graph(pts, k)
    normal, _ = pca_normals(pts, knn, viewpoint)
    return normal[inverse]


def local_geometry(coord: np.ndarray, normal: np.ndarray | None, k: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(knn (N, k), normals (N, 3), curvature (N,)) of distinct points.

    Given normals are kept where they are unit-length; zero (unknown) ones are replaced by the
    PCA estimate. The curvature always comes from PCA."""
    knn, _ = knn_graph(coord, k)
    est, curvature = pca_normals(coord, knn)
    if normal is None:
        return knn, est, curvature
    norm = np.linalg.norm(normal, axis=1)
    known = norm > 0.5
    out = est.copy()
    out[known] = normal[known] / norm[known, None]
    return knn, out, curvature


def knn_edges(knn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed kNN edges (src, dst) as flat int64 arrays."""
    n, k = knn.shape
    return np.repeat(np.arange(n, dtype=np.int64), k), knn.reshape(-1)


class Adjacency:
    """Directed edges grouped by source (CSR), to gather the edges leaving a set of nodes in
    time proportional to their number."""

    def __init__(self, src: np.ndarray, dst: np.ndarray, n: int):
        order = np.argsort(src, kind="stable")
        self.src, self.dst = src[order], dst[order]
        self.start = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(src, minlength=n), out=self.start[1:])

    def edges_from(self, nodes: np.ndarray) -> np.ndarray:
        """Indices (into self.src / self.dst) of every edge leaving ``nodes``."""
        lo, hi = self.start[nodes], self.start[nodes + 1]
        count = hi - lo
        total = int(count.sum())
        if total == 0:
            return np.zeros(0, np.int64)
        offset = np.repeat(lo - np.cumsum(count) + count, count)
        return offset + np.arange(total)


def components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Connected component id (int64, 0..C-1) of each of n nodes for undirected edges."""
    graph = sparse.coo_matrix((np.ones(src.size, np.int8), (src, dst)), shape=(n, n)).tocsr()
    _, comp = csgraph.connected_components(graph, directed=False)
    return comp.astype(np.int64)


def dense_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel ids >= 0 to 0..R-1 in order of first appearance; negatives become NO_REGION."""
    labels = np.asarray(labels)
    out = np.full(labels.shape, NO_REGION, np.int32)
    valid = labels >= 0
    if not valid.any():
        return out
    vals = labels[valid]
    uniq, inverse, first = group_ids(vals, stable=True)
    rank = np.empty(uniq.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(uniq.size)
    out[valid] = rank[inverse]
    return out


def mean_axis(normal: np.ndarray, group: np.ndarray, num_groups: int,
              reference: np.ndarray | None = None) -> np.ndarray:
    """Unit mean normal of each group, sign-free: every normal is first flipped to agree with
    its group's reference (default: the group's first member), so opposite orientations of one
    surface do not cancel. Empty groups give zeros."""
    if reference is None:
        _, inverse, first = group_ids(group, stable=True)
        ref = normal[first[inverse]]
    else:
        ref = reference[group]
    sign = np.where(np.einsum("ij,ij->i", normal, ref) < 0, -1.0, 1.0)
    total = np.stack([np.bincount(group, sign * normal[:, a], num_groups) for a in range(3)], axis=1)
    norm = np.linalg.norm(total, axis=1, keepdims=True)
    return np.where(norm > 0, total / np.where(norm > 0, norm, 1), 0)


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels with regions of fewer than min_size points set to NO_REGION (others unchanged)."""
    labels = labels.copy()
    valid = labels >= 0
    if min_size <= 1 or not valid.any():
        return labels
    sizes = np.bincount(labels[valid])
    labels[valid & (sizes[np.maximum(labels, 0)] < min_size)] = NO_REGION
    return labels


def fill_nearest(coord: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Every NO_REGION point takes the region of its nearest labelled point (Euclidean).
    If no point is labelled, nothing changes."""
    missing = labels < 0
    if not missing.any() or missing.all():
        return labels
    labelled = np.nonzero(~missing)[0]
    _, nearest = cKDTree(coord[labelled]).query(coord[missing], k=1)
    labels = labels.copy()
    labels[missing] = labels[labelled[nearest]]
    return labels


class Moments:
    """Per-group point moments (count, sum, sum of outer products) for least-squares planes.

    Coordinates are shifted by ``origin`` first so the float64 sums stay well conditioned."""

    def __init__(self, coord: np.ndarray, group: np.ndarray, num_groups: int, origin: np.ndarray):
        x = coord.astype(np.float64) - origin
        self.count = np.bincount(group, minlength=num_groups).astype(np.float64)
        self.s1 = np.stack([np.bincount(group, x[:, a], num_groups) for a in range(3)], axis=1)
        self.s2 = np.empty((num_groups, 3, 3))
        for a in range(3):
            for b in range(a, 3):
                self.s2[:, a, b] = self.s2[:, b, a] = np.bincount(group, x[:, a] * x[:, b], num_groups)


def principal_spreads(count: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """(G, 3) standard deviations of each group's points along its principal axes, ascending."""
    c = np.maximum(count, 1)[:, None]
    mean = s1 / c
    cov = s2 / c[:, :, None] - mean[:, :, None] * mean[:, None, :]
    return np.sqrt(np.maximum(np.linalg.eigvalsh(cov), 0))


def plane_from_moments(count: np.ndarray, s1: np.ndarray, s2: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(centroid (G,3), unit normal (G,3), rms distance to the plane (G,), curvature (G,)) of
    the least-squares plane of each group's points, from their moments. Empty groups give a
    zero centroid and an arbitrary normal."""
    c = np.maximum(count, 1)[:, None]
    mean = s1 / c
    cov = s2 / c[:, :, None] - mean[:, :, None] * mean[:, None, :]
    evals, normal = sym3_smallest(cov)
    evals = np.maximum(evals, 0)
    total = evals.sum(axis=1)
    curvature = np.where(total > 0, evals[:, 0] / np.where(total > 0, total, 1), 0)
    return mean, normal, np.sqrt(evals[:, 0]), curvature
