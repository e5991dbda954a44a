"""The RGB-D views: camera poses along a loop around the room, and exact ray casting.

One ray per pixel is cast against the same primitives the points were sampled from (vectorised
over the pixels, culled to each primitive's screen rectangle), so rendered depth equals the depth
of the points and the class of a pixel equals the class of the surface under it; pixel colours
come from appearance.py like point colours.
"""

from __future__ import annotations

import math

import numpy as np

from rayseg.config import SyntheticConfig
from rayseg.data.scene import IGNORE_LABEL
from rayseg.data.synthetic.appearance import _appearance, _to_u8
from rayseg.data.synthetic.geometry import BOX, _Geometry, _inside

CAMERA_HEIGHT = (1.3, 1.7)


def intrinsics(cfg: SyntheticConfig) -> np.ndarray:
    """Pinhole K for cfg.image_width x cfg.image_height and cfg.hfov_deg (pixel centres at integers)."""
    w, h = cfg.image_width, cfg.image_height
    f = (w / 2) / math.tan(math.radians(cfg.hfov_deg) / 2)
    return np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]], float)


def _look_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera-to-world rotation (OpenCV: x right, y down, z forward); pitch > 0 looks down."""
    forward = np.array([math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), -math.sin(pitch)])
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c, s = math.cos(roll), math.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    return np.stack([right, down, forward], axis=1)


def _camera_poses(geo: _Geometry, num_views: int, rng: np.random.Generator) -> np.ndarray:
    """Poses along a loop around the room at eye height, each looking slightly down at something
    (a piece of furniture or the floor) that is not hidden right behind a nearby object."""
    lx, ly, _ = geo.size
    centre = np.array([lx / 2, ly / 2])
    radius = np.array([max(lx / 2 - min(0.9, 0.3 * lx), 0.15), max(ly / 2 - min(0.9, 0.3 * ly), 0.15)])
    start, turn = rng.uniform(0, 2 * math.pi), rng.choice([-1.0, 1.0])
    sweep = rng.uniform(1.2 * math.pi, 2 * math.pi)
    poses = np.zeros((num_views, 4, 4))
    for j in range(num_views):
        angle = start + turn * sweep * j / num_views + rng.normal(0, 0.05)
        xy = centre + radius * np.array([math.cos(angle), math.sin(angle)]) + rng.normal(0, 0.1, 2)
        pos = np.array([*xy, rng.uniform(*CAMERA_HEIGHT)])
        for _ in range(6):  # step towards the room centre while standing in furniture
            if not _inside(geo, pos[None], grow=0.35)[0]:
                break
            pos[:2] += 0.3 * (centre - pos[:2])
        target = _pick_target(geo, pos, rng)
        flat = float(np.hypot(*(target[:2] - pos[:2])))
        yaw = math.atan2(target[1] - pos[1], target[0] - pos[0])
        pitch = float(np.clip(math.atan2(pos[2] - target[2], flat), math.radians(10), math.radians(35)))
        poses[j, :3, :3] = _look_rotation(yaw, pitch, rng.normal(0, 0.03))
        poses[j, :3, 3] = pos
        poses[j, 3, 3] = 1.0
    return poses


def _pick_target(geo: _Geometry, pos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A point to look at: random primitive centres and floor spots, preferring ones at least
    1.2 m away whose line of sight is free (probed with _inside) until 0.8 m before them."""
    lx, ly, _ = geo.size
    objects = geo.center[rng.choice(geo.num_prims, min(geo.num_prims, 6), replace=False)]
    floor = np.column_stack([rng.uniform(0.1, 0.9, 3) * lx, rng.uniform(0.1, 0.9, 3) * ly,
                             rng.uniform(0.3, 1.0, 3)])
    targets = np.concatenate([objects, floor])
    length = np.linalg.norm(targets - pos, axis=1)
    fractions = np.linspace(0.1, 0.9, 9)
    probes = pos + fractions[None, :, None] * (targets - pos)[:, None, :]  # (T, 9, 3)
    relevant = fractions[None, :] * length[:, None] <= length[:, None] - 0.8
    blocked = (_inside(geo, probes.reshape(-1, 3), grow=0.02).reshape(probes.shape[:2]) & relevant).any(1)
    flat = np.hypot(targets[:, 0] - pos[0], targets[:, 1] - pos[1])
    good = np.flatnonzero(~blocked & (flat >= 1.2))
    if good.size:
        return targets[rng.choice(good)]
    free = np.flatnonzero(~blocked)
    pool = free if free.size else np.arange(len(targets))
    return targets[pool[np.argmax(flat[pool])]]


def _screen_windows(geo: _Geometry, pose: np.ndarray, k: np.ndarray, w: int, h: int) -> np.ndarray:
    """Per primitive the pixel rectangle (v0, v1, u0, u1) that can see it; empty when culled."""
    cam = (geo.corners - pose[:3, 3]) @ pose[:3, :3]  # (P, 8, 3) camera coordinates
    z = cam[..., 2]
    front = z > 1e-3
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(front, k[0, 0] * cam[..., 0] / z + k[0, 2], np.nan)
        v = np.where(front, k[1, 1] * cam[..., 1] / z + k[1, 2], np.nan)
    windows = np.zeros((geo.num_prims, 4), np.int64)
    some = front.any(axis=1)
    whole = some & ~front.all(axis=1)  # straddles the camera plane: test every pixel
    part = front.all(axis=1)
    windows[whole] = (0, h, 0, w)
    if part.any():
        vmin, vmax = np.nanmin(v[part], 1), np.nanmax(v[part], 1)
        umin, umax = np.nanmin(u[part], 1), np.nanmax(u[part], 1)
        windows[part, 0] = np.clip(np.floor(vmin), 0, h)
        windows[part, 1] = np.clip(np.ceil(vmax) + 1, 0, h)
        windows[part, 2] = np.clip(np.floor(umin), 0, w)
        windows[part, 3] = np.clip(np.ceil(umax) + 1, 0, w)
    return windows


def _hit_box(o, dx, dy, dz, half) -> np.ndarray:
    """Entry distance along rays (origin o, directions d, local frame) into a centred box; inf = miss."""
    t_near = np.full(dx.shape, -np.inf, np.float32)
    t_far = np.full(dx.shape, np.inf, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for oa, da, ha in zip(o, (dx, dy, dz), half):
            inv = 1.0 / da
            t1, t2 = (-ha - oa) * inv, (ha - oa) * inv
            t_near = np.maximum(t_near, np.minimum(t1, t2))
            t_far = np.minimum(t_far, np.maximum(t1, t2))
    return np.where((t_near <= t_far) & (t_near > 1e-4), t_near, np.float32(np.inf))


def _hit_cylinder(o, dx, dy, dz, radius: float, hz: float) -> np.ndarray:
    """Entry distance into a vertical centred cylinder (side or the cap facing the camera)."""
    ox, oy, oz = o
    with np.errstate(divide="ignore", invalid="ignore"):
        a = dx * dx + dy * dy
        b = 2.0 * (ox * dx + oy * dy)
        c = ox * ox + oy * oy - radius * radius
        disc = b * b - 4.0 * a * c
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
        side = (disc >= 0) & (a > 1e-12) & (t > 1e-4) & (np.abs(oz + t * dz) <= hz)
        t = np.where(side, t, np.float32(np.inf))
        if abs(oz) > hz:  # the camera is above (below) the cylinder: it can see the top (bottom) cap
            plane = hz if oz > 0 else -hz
            tc = (plane - oz) / dz
            on_cap = (tc > 1e-4) & ((ox + tc * dx) ** 2 + (oy + tc * dy) ** 2 <= radius * radius)
            t = np.minimum(t, np.where(on_cap, tc, np.float32(np.inf)))
    return t


def _cast(geo: _Geometry, pose: np.ndarray, k: np.ndarray, w: int, h: int):
    """Ray-cast one view: (depth (H, W) with inf = no hit, surface id (H, W) with -1 = none, dirs)."""
    origin = pose[:3, 3]
    xs = ((np.arange(w) - k[0, 2]) / k[0, 0]).astype(np.float32)
    ys = ((np.arange(h) - k[1, 2]) / k[1, 1]).astype(np.float32)
    rot = pose[:3, :3].astype(np.float32)
    # direction of pixel (u, v) = R @ (x_u, y_v, 1): its ray parameter t is the camera z depth
    dirs = [(rot[a, 0] * xs[None, :] + rot[a, 1] * ys[:, None] + rot[a, 2]).astype(np.float32)
            for a in range(3)]

    # the shell, seen from inside: the ray leaves the room box through one of its six faces
    depth = np.full((h, w), np.inf, np.float32)
    surface = np.full((h, w), -1, np.int64)
    with np.errstate(divide="ignore"):
        for a in range(3):
            d = dirs[a]
            t_hi = float(geo.size[a] - origin[a]) / d
            t_lo = float(-origin[a]) / d
            t = np.where(d > 0, t_hi, np.where(d < 0, t_lo, np.float32(np.inf)))
            face = np.where(d > 0, 2 * a + 1, 2 * a)
            closer = t < depth
            depth[closer] = t[closer]
            surface[closer] = geo.num_prims + face[closer]
    if not geo.ceiling:  # no ceiling (ScanNet): rays leaving through the top hit nothing
        up = surface == geo.num_prims + 5
        depth[up], surface[up] = np.inf, -1

    for p, (v0, v1, u0, u1) in enumerate(_screen_windows(geo, pose, k, w, h)):
        if v0 >= v1 or u0 >= u1:
            continue
        dx, dy, dz = (d[v0:v1, u0:u1] for d in dirs)
        c, s = float(geo.cos[p]), float(geo.sin[p])
        # Python floats keep the window arithmetic in float32
        rx, ry, rz = (float(v) for v in origin - geo.center[p])
        o = (c * rx + s * ry, -s * rx + c * ry, rz)
        hx, hy, hz = (float(v) for v in geo.half[p])
        if geo.kind[p] == BOX:
            if s != 0.0:
                dx, dy = c * dx + s * dy, -s * dx + c * dy
            t = _hit_box(o, dx, dy, dz, (hx, hy, hz))
        else:
            t = _hit_cylinder(o, dx, dy, dz, hx, hz)
        closer = t < depth[v0:v1, u0:u1]
        np.copyto(depth[v0:v1, u0:u1], t, where=closer)
        np.copyto(surface[v0:v1, u0:u1], p, where=closer)
    return depth, surface, dirs


def _render_views(geo: _Geometry, cfg: SyntheticConfig, rng: np.random.Generator) -> dict:
    v, w, h = cfg.num_views, cfg.image_width, cfg.image_height
    k = intrinsics(cfg)
    poses = _camera_poses(geo, v, rng)
    out = {
        "view_rgb": np.zeros((v, h, w, 3), np.uint8),
        "view_depth": np.zeros((v, h, w), np.float32),
        "view_pose": poses.astype(np.float32),
        "view_intrinsics": np.repeat(k[None].astype(np.float32), v, axis=0),
        "view_frame": (rng.integers(0, 30) + np.cumsum(rng.integers(15, 45, v))).astype(np.int32),
        "view_label": np.full((v, h, w), IGNORE_LABEL, np.uint8),
    }
    for j in range(v):
        depth, surface, dirs = _cast(geo, poses[j], k, w, h)
        hit = surface >= 0
        ray = np.stack([d[hit] for d in dirs], axis=1)
        x = poses[j, :3, 3].astype(np.float32) + depth[hit][:, None] * ray  # hit points (depth = t)
        sid = surface[hit]
        colour, _ = _appearance(geo, sid, x)
        out["view_rgb"][j][hit] = _to_u8(colour, rng)
        out["view_depth"][j][hit] = depth[hit]
        out["view_label"][j][hit] = geo.label[sid]
    return out
