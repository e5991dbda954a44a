"""The finished room as arrays, and the geometric queries that points and views share.

``_Geometry`` freezes a built ``_Room`` (layout.py) into arrays: primitives (boxes turned by a yaw
about z, vertical cylinders), per-surface label / instance / colour / texture, and the face table
that point sampling draws from. The queries live here rather than with one of their users:
``_inside`` (is a point inside a solid) serves both point sampling (sampling.py) and camera
placement (rendering.py), ``_normals_on`` (outward normal of a point on a surface) the shading of
pixel hit points (appearance.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rayseg.data.synthetic.layout import _Room

BOX, CYLINDER = 0, 1
# Shell faces in surface order: x-lo, x-hi, y-lo, y-hi wall sides, floor, ceiling; inward normals.
SHELL_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)


class _Geometry:
    """Arrays of one finished room. Surfaces 0..P-1 are the primitives, P..P+5 the shell faces."""

    def __init__(self, room: "_Room") -> None:
        prims = room.prims
        self.size = np.array(room.size)
        self.ceiling = room.ceiling
        self.light = np.array(room.light)
        self.num_prims = len(prims)
        self.kind = np.array([p[0] for p in prims], np.int8)
        self.center = np.array([p[1] for p in prims], float).reshape(-1, 3)
        self.half = np.array([p[2] for p in prims], float).reshape(-1, 3)
        self.yaw = np.array([p[3] for p in prims], float)
        self.cos, self.sin = np.cos(self.yaw), np.sin(self.yaw)
        surfaces = room.surfaces + room.shell
        self.label = np.array([s[0] for s in surfaces], np.uint8)
        self.instance = np.array([s[1] for s in surfaces], np.int32)
        self.base = np.array([s[2] for s in surfaces], np.float32)
        self.freq = np.array([s[3][0] for s in surfaces], np.float32)
        self.phase = np.array([s[3][1] for s in surfaces], np.float32)
        self.amp = np.array([s[3][2] for s in surfaces], np.float32)
        self._build_faces()
        self._build_corners()

    def _build_faces(self) -> None:
        """Face table for area-proportional sampling: (surface, type, axis, sign, area)."""
        rows = []  # type 0 box face, 1 cylinder side, 2 cylinder cap, 3 shell face
        for p in range(self.num_prims):
            hx, hy, hz = self.half[p]
            if self.kind[p] == BOX:
                areas = (4 * hy * hz, 4 * hx * hz, 4 * hx * hy)
                rows += [(p, 0, a, s, areas[a]) for a in range(3) for s in (-1, 1)]
            else:
                rows.append((p, 1, 2, 0, 2 * math.pi * hx * 2 * hz))
                rows += [(p, 2, 2, s, math.pi * hx * hx) for s in (-1, 1)]
        lx, ly, lz = self.size
        shell_areas = (ly * lz, ly * lz, lx * lz, lx * lz, lx * ly, lx * ly if self.ceiling else 0.0)
        for f, area in enumerate(shell_areas):
            if area > 0:
                rows.append((self.num_prims + f, 3, f // 2, 1 - 2 * (f % 2), area))
        table = np.array(rows, float)
        self.face_surface = table[:, 0].astype(np.int64)
        self.face_type = table[:, 1].astype(np.int8)
        self.face_axis = table[:, 2].astype(np.int64)
        self.face_sign = table[:, 3]
        self.face_area = table[:, 4]

    def _build_corners(self) -> None:
        """World corners (P, 8, 3) of each primitive's bounding box, for screen-space culling."""
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
        local = signs[None] * self.half[:, None, :]
        self.corners = _rotate_z(local, self.cos[:, None], self.sin[:, None]) + self.center[:, None, :]

    def to_local(self, p: int, x: np.ndarray) -> np.ndarray:
        """World points (..., 3) in the frame of primitive p (centre at the origin, yaw undone)."""
        return _rotate_z(x - self.center[p], self.cos[p], -self.sin[p])


def _rotate_z(v: np.ndarray, c, s) -> np.ndarray:
    """Rotate vectors (..., 3) about z by the angle with cosine c and sine s."""
    out = np.empty(v.shape)
    out[..., 0] = c * v[..., 0] - s * v[..., 1]
    out[..., 1] = s * v[..., 0] + c * v[..., 1]
    out[..., 2] = v[..., 2]
    return out


def _inside(geo: _Geometry, x: np.ndarray, grow: float = 0.0) -> np.ndarray:
    """Which points (n, 3) lie strictly inside some primitive (each grown by ``grow``)."""
    inside = np.zeros(len(x), bool)
    lo = geo.corners.min(axis=1) - grow
    hi = geo.corners.max(axis=1) + grow
    by_x = np.argsort(x[:, 0])
    sorted_x = x[by_x, 0]
    for p in range(geo.num_prims):
        first, last = np.searchsorted(sorted_x, (lo[p, 0], hi[p, 0]))
        near = by_x[first:last]
        near = near[((x[near, 1:] > lo[p, 1:]) & (x[near, 1:] < hi[p, 1:])).all(axis=1)]
        if near.size == 0:
            continue
        local = geo.to_local(p, x[near])
        h = geo.half[p] + grow
        if geo.kind[p] == BOX:
            hit = (np.abs(local) < h).all(axis=1)
        else:
            hit = (local[:, 0] ** 2 + local[:, 1] ** 2 < h[0] ** 2) & (np.abs(local[:, 2]) < h[2])
        inside[near[hit]] = True
    return inside


def _normals_on(geo: _Geometry, s: int, x: np.ndarray) -> np.ndarray:
    """Outward normals at points x (m, 3) lying on surface s."""
    if s >= geo.num_prims:
        return np.broadcast_to(SHELL_NORMALS[s - geo.num_prims], x.shape)
    local = geo.to_local(s, x)
    h = geo.half[s]
    normal = np.zeros_like(local)
    if geo.kind[s] == BOX:  # the face whose slab the point is on: largest |local| / half
        axis = np.argmax(np.abs(local) / h, axis=1)
        rows = np.arange(len(x))
        normal[rows, axis] = np.sign(local[rows, axis])
    else:  # cylinder: a cap if the point is relatively further along z than radially
        radial = np.hypot(local[:, 0], local[:, 1])
        cap = np.abs(local[:, 2]) / h[2] >= radial / h[0]
        safe = np.maximum(radial, 1e-9)
        normal[:, 0] = np.where(cap, 0.0, local[:, 0] / safe)
        normal[:, 1] = np.where(cap, 0.0, local[:, 1] / safe)
        normal[:, 2] = np.where(cap, np.sign(local[:, 2]), 0.0)
    return _rotate_z(normal, geo.cos[s], geo.sin[s])
