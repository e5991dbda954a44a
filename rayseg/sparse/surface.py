"""Scanned-surface-like voxel sets for tests and benchmarks.

Indoor scans are thin surfaces, not solid volumes: a voxel has ~9 of its 26 neighbours on a
flat patch. Sparse-conv speed and memory depend on that, so tests and benchmarks use a room
(floor, walls, boxes standing in for furniture, a tilted board and a cylinder) sampled on its
surfaces with a little noise, instead of random cubes.
"""

from __future__ import annotations

import numpy as np


def _room_points(rng: np.random.Generator, scale: float, density: float) -> np.ndarray:
    """Points on the surfaces of a (4 x 3.5 x 2.6) * scale metre room."""
    sx, sy, sz = 4.0 * scale, 3.5 * scale, 2.6 * scale

    def plane(origin, u, v):
        area = float(np.linalg.norm(np.cross(u, v)))
        n = max(int(area * density), 1)
        a, b = rng.random((2, n, 1))
        return np.asarray(origin) + a * np.asarray(u) + b * np.asarray(v)

    parts = [
        plane((0, 0, 0), (sx, 0, 0), (0, sy, 0)),            # floor
        plane((0, 0, 0), (sx, 0, 0), (0, 0, sz)),            # four walls
        plane((0, sy, 0), (sx, 0, 0), (0, 0, sz)),
        plane((0, 0, 0), (0, sy, 0), (0, 0, sz)),
        plane((sx, 0, 0), (0, sy, 0), (0, 0, sz)),
        plane((0.3 * sx, 0.2 * sy, 0.2), (0.3 * sx, 0, 0.4), (0, 0.25 * sy, 0)),  # tilted board
    ]
    for _ in range(6):  # boxes: tables, cabinets (top + 4 sides)
        w, d, h = rng.uniform(0.1, 0.35) * sx, rng.uniform(0.1, 0.3) * sy, rng.uniform(0.15, 0.45) * sz
        x0, y0 = rng.uniform(0.02 * sx, 0.98 * sx - w), rng.uniform(0.02 * sy, 0.98 * sy - d)
        parts += [
            plane((x0, y0, h), (w, 0, 0), (0, d, 0)),
            plane((x0, y0, 0), (w, 0, 0), (0, 0, h)),
            plane((x0, y0 + d, 0), (w, 0, 0), (0, 0, h)),
            plane((x0, y0, 0), (0, d, 0), (0, 0, h)),
            plane((x0 + w, y0, 0), (0, d, 0), (0, 0, h)),
        ]
    # a round column: curved surfaces give the irregular neighbourhoods planes do not
    r, h = 0.06 * sx, sz
    n = int(2 * np.pi * r * h * density)
    t, z = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, h, n)
    parts.append(np.stack([0.8 * sx + r * np.cos(t), 0.7 * sy + r * np.sin(t), z], axis=1))
    return np.concatenate(parts)


def scanned_surface_voxels(num_voxels: int, voxel_size: float = 0.02, seed: int = 0) -> np.ndarray:
    """Unique int32 voxel coordinates (M, 3), M close to `num_voxels`, of a scanned-like room.

    The room is scaled so its surfaces cover about `num_voxels` voxels; points get Gaussian
    noise of a sixth of a voxel (scanner noise), so surfaces are 1-2 voxels thick in places.
    Coordinates are shifted so that some are negative (augmented scenes are not all positive).
    """
    if num_voxels < 1:
        raise ValueError(f"num_voxels must be >= 1, got {num_voxels}")
    rng = np.random.default_rng(seed)
    density = 6.0 / voxel_size**2  # ~6 samples per voxel face: nearly every surface voxel is hit
    scale = (num_voxels * voxel_size**2 / 75.0) ** 0.5  # a scale-1 room has ~75 m2 of surfaces
    for _ in range(8):  # the voxel count grows ~ quadratically with the room scale
        pts = _room_points(rng, scale, density)
        pts += rng.normal(scale=voxel_size / 6, size=pts.shape)
        # a scan is not aligned to the voxel grid: random yaw and sub-voxel shift
        yaw = rng.uniform(0, np.pi / 2)
        c, s = np.cos(yaw), np.sin(yaw)
        pts = pts @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T + rng.uniform(0, voxel_size, 3)
        vox = np.unique(np.floor(pts / voxel_size).astype(np.int64), axis=0)
        ratio = num_voxels / len(vox)
        if 0.97 < ratio < 1.03 or len(vox) < 2:
            break
        scale *= ratio ** 0.5
    vox = vox[rng.permutation(len(vox))][: max(num_voxels, 1)]  # scanner order is not sorted
    vox -= (vox.max(axis=0) + vox.min(axis=0)) // 2  # centre the room: negative coordinates too
    return vox.astype(np.int32)
