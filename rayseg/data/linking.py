"""Point-pixel links: which pixel of a posed RGB-D view sees which point of the cloud.

A point links to a pixel when, projected through the view's pose and intrinsics, it lands inside
the image in front of the camera and the view's depth at that pixel agrees with the point's depth
(|depth - z| <= tol, tol = the voxel size): points hidden behind a nearer surface do not link.

Conventions (rayseg/data/scene.py): world frame in metres, OpenCV pinhole camera, the pose is
camera-to-world, pixel (x, y) covers [x - 0.5, x + 0.5) around its centre at integer coordinates,
and flat pixel indices are y * W + x.
"""

from __future__ import annotations

import numpy as np


def link_points(
    coord: np.ndarray, depth: np.ndarray, pose: np.ndarray, K: np.ndarray, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """Links between points and pixels of one view.

    coord: (N, 3) world coordinates (un-augmented). depth: (H, W) metres, 0 or non-finite =
    invalid (never links). pose: (4, 4) camera-to-world. K: (3, 3) intrinsics at H x W.
    tol: occlusion tolerance in metres.

    Returns (point_idx int64 (L,), pixel_flat int64 (L,)), ordered by point index. Several points
    may link to the same pixel; each point links to at most one pixel.
    """
    coord = np.asarray(coord)
    if coord.ndim != 2 or coord.shape[1] != 3:
        raise ValueError(f"link_points: coord must have shape (N, 3), got {coord.shape}")
    if depth.ndim != 2:
        raise ValueError(f"link_points: depth must have shape (H, W), got {depth.shape}")
    if pose.shape != (4, 4) or K.shape != (3, 3):
        raise ValueError(f"link_points: pose must be (4, 4) and K (3, 3), got {pose.shape} and {K.shape}")
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if not np.isfinite(pose).all() or not np.isfinite(K).all():
        return empty
    h, w = depth.shape
    world_to_cam = np.linalg.inv(pose.astype(np.float64))
    cam = coord.astype(np.float64) @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    z = cam[:, 2]
    in_front = z > 1e-6
    idx = np.nonzero(in_front)[0]
    cam, z = cam[idx], z[idx]
    K = K.astype(np.float64)
    u = K[0, 0] * cam[:, 0] / z + K[0, 1] * cam[:, 1] / z + K[0, 2]
    v = K[1, 1] * cam[:, 1] / z + K[1, 2]
    px = np.floor(u + 0.5)
    py = np.floor(v + 0.5)
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    idx, z = idx[inside], z[inside]
    px, py = px[inside].astype(np.int64), py[inside].astype(np.int64)
    d = depth[py, px].astype(np.float64)
    visible = np.isfinite(d) & (d > 0) & (np.abs(d - z) <= tol)
    return idx[visible].astype(np.int64), (py[visible] * w + px[visible]).astype(np.int64)


def backproject(depth: np.ndarray, pose: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World coordinates of the pixels with a valid depth: (flat pixel indices (P,), xyz (P, 3)).
    Inverse of the projection link_points uses (pixel centres at integer coordinates)."""
    h, w = depth.shape
    flat = np.nonzero((np.isfinite(depth) & (depth > 0)).reshape(-1))[0]
    if flat.size == 0 or not np.isfinite(pose).all() or not np.isfinite(K).all():
        return np.zeros(0, np.int64), np.zeros((0, 3))
    y, x = np.divmod(flat, w)
    z = depth.reshape(-1)[flat].astype(np.float64)
    K = K.astype(np.float64)
    cy = (y - K[1, 2]) * z / K[1, 1]
    cx = (x - K[0, 2] - K[0, 1] * cy / z) * z / K[0, 0]
    cam = np.stack([cx, cy, z], axis=1)
    return flat.astype(np.int64), cam @ pose[:3, :3].astype(np.float64).T + pose[:3, 3]


def removed_pixel_mask(tree, removed: np.ndarray, depth: np.ndarray, pose: np.ndarray, K: np.ndarray,
                       max_distance: float) -> np.ndarray:
    """(H, W) bool: pixels showing a removed surface. Each pixel is back-projected with its depth
    and takes the status of its nearest point of the whole cloud (`tree`: a scipy cKDTree over
    every point, `removed` (N,) bool). Pixels farther than max_distance from any point, or
    without depth, are kept (False)."""
    h, w = depth.shape
    mask = np.zeros(h * w, bool)
    flat, xyz = backproject(depth, pose, K)
    if flat.size:
        dist, nearest = tree.query(xyz, k=1, distance_upper_bound=max_distance)
        hit = np.isfinite(dist)
        mask[flat[hit]] = removed[nearest[hit]]
    return mask.reshape(h, w)
