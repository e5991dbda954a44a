"""2D regions (for 2D RPC): pixels back-projected to 3D and partitioned like points.

For one view (depth in metres, 0 / non-finite = invalid; OpenCV pinhole K; pose camera-to-world;
pixel centres at integer coordinates, as in rayseg/data/linking.py):

1. every pixel with valid depth is back-projected, X = pose . (z K^-1 [x, y, 1]), giving world
   coordinates (a non-finite pose leaves them in the camera frame: partitions do not depend on
   the frame except through VCCS's voxel grid);
2. the valid pixels on the grid of every ``view_stride``-th row and column are the samples; they
   are partitioned with the method, colours from the view's RGB, normals by PCA (the partition
   never depends on their orientation);
3. every valid pixel takes the region of its nearest sample in 3D among the (up to 4) grid
   samples around it (so across a depth edge a pixel joins the surface it lies on); a pixel
   whose surrounding samples are all invalid takes the region of the nearest sample overall;
4. invalid pixels get NO_REGION; a view with no more than ``knn`` valid samples is all NO_REGION
   (nothing to partition), a view with zero area is an error.

``pointwise`` skips the sampling: every valid pixel is its own region. The gt oracle labels a
pixel with the gt region of the nearest scene point (rayseg.partition.gt.view_partition).
Region ids are per view (0..R-1), independent of the 3D ids (gt: the scene's gt region ids).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from rayseg.config import PartitionConfig
from rayseg.data.scene import NO_REGION
from rayseg.partition import geometry, partition_points


def backproject(depth: np.ndarray, pose: np.ndarray, K: np.ndarray, name: str = "view"
                ) -> tuple[np.ndarray, np.ndarray]:
    """(points (H, W, 3) float32 in the world frame, valid (H, W) bool) of a depth image."""
    K = np.asarray(K, np.float64)
    if K.shape != (3, 3) or not np.isfinite(K).all() or np.linalg.det(K) == 0:
        raise geometry.PartitionError(f"{name}: view_intrinsics: expected a finite invertible 3x3 K, "
                                      f"got {K.tolist()}")
    depth = np.asarray(depth, dtype=np.float64)
    h, w = depth.shape
    valid = np.isfinite(depth) & (depth > 0)
    y, x = np.mgrid[0:h, 0:w]
    pix = np.stack([x, y, np.ones_like(x)], axis=-1).astype(np.float64)
    z = np.where(valid, depth, 0.0)
    cam = (pix @ np.linalg.inv(K).T) * z[..., None]
    pose = np.asarray(pose, np.float64)
    if np.isfinite(pose).all():
        cam = cam @ pose[:3, :3].T + pose[:3, 3]
    return cam.astype(np.float32), valid


def view_regions(method: str, rgb: np.ndarray | None, depth: np.ndarray, pose: np.ndarray,
                 K: np.ndarray, cfg: PartitionConfig, name: str = "view") -> np.ndarray:
    """Pixel region ids (H, W) int32 of one view for an unsupervised method (module doc)."""
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise geometry.PartitionError(f"{name}: depth: expected shape (H, W), got {depth.shape}")
    h, w = depth.shape
    if h == 0 or w == 0:
        raise geometry.PartitionError(f"{name}: view has zero area ({h}x{w} pixels)")
    if rgb is not None and np.asarray(rgb).shape != (h, w, 3):
        raise geometry.PartitionError(f"{name}: rgb: expected shape ({h}, {w}, 3), got {np.asarray(rgb).shape}")
    world, valid = backproject(depth, pose, K, name)
    out = np.full((h, w), NO_REGION, np.int32)
    if method == "pointwise":
        out[valid] = np.arange(int(valid.sum()), dtype=np.int32)
        return out
    s = cfg.view_stride
    grid = np.zeros((h, w), bool)
    grid[::s, ::s] = True
    sample = valid & grid
    if int(sample.sum()) <= cfg.knn:
        return out
    pts = world[sample]
    colors = None if rgb is None else np.asarray(rgb)[sample]
    out[sample] = partition_points(method, pts, colors, None, cfg, name=name)
    if s > 1:
        out[valid] = _nearest_sample_region(world, valid, sample, out, s)
    return out


def _nearest_sample_region(world: np.ndarray, valid: np.ndarray, sample: np.ndarray,
                           sample_region: np.ndarray, s: int) -> np.ndarray:
    """Region of the nearest sample in 3D for every valid pixel (step 3 of the module doc).

    The nearest sample is searched among the (up to) 4 grid samples around the pixel, which
    holds it unless those are all invalid; such pixels search all samples with a k-d tree."""
    h, w = valid.shape
    ys, xs = np.nonzero(valid)
    pts = world[ys, xs]
    best = np.full(ys.size, np.inf)
    region = np.full(ys.size, NO_REGION, np.int32)
    for dy in (0, s):
        for dx in (0, s):
            cy, cx = (ys // s) * s + dy, (xs // s) * s + dx
            inside = (cy < h) & (cx < w)
            cy, cx = np.minimum(cy, h - 1), np.minimum(cx, w - 1)
            ok = inside & sample[cy, cx]
            d = world[cy, cx] - pts
            dist = np.where(ok, np.einsum("ij,ij->i", d, d), np.inf)
            closer = dist < best
            best[closer] = dist[closer]
            region[closer] = sample_region[cy[closer], cx[closer]]
    lost = ~np.isfinite(best)
    if lost.any():
        sy, sx = np.nonzero(sample)
        _, nearest = cKDTree(world[sy, sx]).query(pts[lost], k=1)
        region[lost] = sample_region[sy[nearest], sx[nearest]]
    return region
