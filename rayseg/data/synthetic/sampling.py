"""The point cloud: area-proportional samples on the exposed faces of a finished room.

Points are sampled on every primitive and shell face, area-proportionally, and a point is kept
only if its face is exposed (just outside the face, along the normal, there is neither another
solid nor the outside of the room), so faces against walls, floors or other parts are never
sampled. The count is ``points_per_m2`` x exposed area, clipped to [min_points, max_points].
"""

from __future__ import annotations

import math

import numpy as np

from rayseg.config import SyntheticConfig
from rayseg.data.synthetic.geometry import _Geometry, _inside, _rotate_z


def _sample_faces(geo: _Geometry, n: int, rng: np.random.Generator):
    """n points uniformly on all faces (area-proportional) -> (coord, normal, surface)."""
    face = rng.choice(len(geo.face_area), size=n, p=geo.face_area / geo.face_area.sum())
    surface = geo.face_surface[face]
    ftype, axis, sign = geo.face_type[face], geo.face_axis[face], geo.face_sign[face]
    u = rng.random((n, 3))
    local = np.zeros((n, 3))
    normal = np.zeros((n, 3))
    box = np.flatnonzero(ftype == 0)
    h = geo.half[surface[box]]
    local[box] = (2 * u[box] - 1) * h
    local[box, axis[box]] = sign[box] * h[np.arange(len(box)), axis[box]]
    normal[box, axis[box]] = sign[box]

    side = np.flatnonzero(ftype == 1)
    r, hz = geo.half[surface[side], 0], geo.half[surface[side], 2]
    theta = 2 * math.pi * u[side, 0]
    normal[side, 0], normal[side, 1] = np.cos(theta), np.sin(theta)
    local[side, 0], local[side, 1] = r * normal[side, 0], r * normal[side, 1]
    local[side, 2] = (2 * u[side, 1] - 1) * hz

    cap = np.flatnonzero(ftype == 2)
    r, hz = geo.half[surface[cap], 0], geo.half[surface[cap], 2]
    rho, theta = r * np.sqrt(u[cap, 0]), 2 * math.pi * u[cap, 1]
    local[cap, 0], local[cap, 1], local[cap, 2] = rho * np.cos(theta), rho * np.sin(theta), sign[cap] * hz
    normal[cap, 2] = sign[cap]

    # primitives: local frame -> world
    prim = np.flatnonzero(ftype != 3)
    p = surface[prim]
    coord = np.zeros((n, 3))
    coord[prim] = _rotate_z(local[prim], geo.cos[p], geo.sin[p]) + geo.center[p]
    normal[prim] = _rotate_z(normal[prim], geo.cos[p], geo.sin[p])

    # shell faces: a wall/floor/ceiling rectangle of the room box, normal pointing into the room
    shell = np.flatnonzero(ftype == 3)
    coord[shell] = u[shell] * geo.size
    coord[shell, axis[shell]] = np.where(sign[shell] > 0, 0.0, geo.size[axis[shell]])
    normal[shell, axis[shell]] = sign[shell]
    return coord, normal, surface


def _exposed(geo: _Geometry, coord: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """A face point is exposed if just outside it there is room air, not a solid or the outside."""
    probe = coord + 2e-3 * normal
    in_room = ((probe > 0) & (probe < geo.size)).all(axis=1)
    return in_room & ~_inside(geo, probe)


def _sample_points(geo: _Geometry, cfg: SyntheticConfig, rng: np.random.Generator):
    """Points on exposed faces; count = points_per_m2 x exposed area, clipped to [min, max]."""
    total_area = geo.face_area.sum()
    batch = int(np.clip(cfg.points_per_m2 * total_area, cfg.min_points, cfg.max_points) * 1.2)
    parts, kept, drawn, target, fraction = [], 0, 0, None, 1.0
    while target is None or kept < target:
        coord, normal, surface = _sample_faces(geo, batch, rng)
        keep = _exposed(geo, coord, normal)
        parts.append((coord[keep], normal[keep], surface[keep]))
        kept += int(keep.sum())
        drawn += batch
        fraction = max(kept / drawn, 1e-3)
        if target is None:  # exposed area estimated from the first batch
            target = int(np.clip(round(cfg.points_per_m2 * total_area * fraction), cfg.min_points,
                                 cfg.max_points))
        batch = int((target - kept) / fraction * 1.2) + 256
    coord, normal, surface = (np.concatenate(a)[:target] for a in zip(*parts))
    return coord, normal, surface
