"""Procedural indoor rooms with exactly ray-cast RGB-D views: rayseg's embedded dataset.

Scene ``i`` is a function of ``(cfg, i)`` alone (a generator seeded with ``(cfg.seed, i)``), so Ray
tasks can generate scenes independently and in any order.

Geometry. A room is the interior box ``[0, Lx] x [0, Ly] x [0, H]`` (its "shell": the floor, four
wall sides and, in the S3DIS profile, a ceiling) plus solid primitives: boxes turned by a yaw about
z, and vertical cylinders. Furniture is made of several primitives sharing one class and instance.
Points are sampled on every primitive face, area-proportionally, and a point is kept only if its
face is exposed (just outside the face, along the normal, there is neither another solid nor the
outside of the room), so faces against walls, floors or other parts are never sampled. Views are
rendered by casting one ray per pixel against the same primitives (vectorised over the pixels,
culled to each primitive's screen rectangle), so rendered depth equals the depth of the points and
the class of a pixel equals the class of the surface the points were sampled from.

Appearance. Each surface has a base colour drawn per instance from its class palette (palettes
overlap between classes) and a texture: a few 3D sinusoids of the world position. Colour =
(base + texture(x)) * Lambert shading from a point light, for points and pixels alike, so 2D and 3D
appearance agree; neither colour nor shape alone gives the class away.

Rooms. Each profile has several room types (bedroom, kitchen, bathroom, office, ...; for S3DIS
office, hallway, storage, ...) with plausible co-occurrences (chairs around tables, nightstands by
the bed, counters on cabinets, curtains beside windows, shower curtains on bathtubs), so scene tags
vary across scenes. Objects outside the class set mirror the real data: ScanNet leaves them
unlabelled (IGNORE_LABEL), S3DIS calls them clutter.
"""

from __future__ import annotations

import math

import numpy as np

from rayseg.config import SyntheticConfig
from rayseg.data.scene import IGNORE_LABEL, PROFILES

BOX, CYLINDER = 0, 1
GENERATOR_VERSION = 2
"""Bumped whenever the same SyntheticConfig would generate different scenes (2: doors only in
door_p of the rooms); stored with the settings in the manifest, so `prepare` refuses to top up a
folder made by another version."""
TEXTURE_WAVES = 4
CAMERA_HEIGHT = (1.3, 1.7)
# Shell faces in surface order: x-lo, x-hi, y-lo, y-hi wall sides, floor, ceiling; inward normals.
SHELL_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
_AMBIENT = 0.4
_COLOR_NOISE = 0.012  # per point / per pixel sensor noise, colour in [0, 1]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def class_names(profile: str) -> tuple[str, ...]:
    """Class names of a dataset profile ('scannet20' or 's3dis13')."""
    if profile not in PROFILES:
        raise ValueError(f"unknown synthetic profile {profile!r}; known: {sorted(PROFILES)}")
    return PROFILES[profile]


def scene_ids(cfg: SyntheticConfig) -> list[tuple[str, str]]:
    """[(scene_id, split)] for every scene of cfg, in index order. The last scenes are 'val'."""
    return [(_scene_id(i), _split(cfg, i)) for i in range(cfg.num_scenes)]


def room_type(cfg: SyntheticConfig, index: int) -> str:
    """Room type of scene ``index`` (they cycle through the profile's types, so all occur)."""
    return _ROOM_TYPES[cfg.profile][index % len(_ROOM_TYPES[cfg.profile])][0]


def generate_scene(cfg: SyntheticConfig, index: int) -> dict:
    """Scene record ``index`` of cfg (see rayseg/data/scene.py), deterministic in (cfg, index)."""
    if not 0 <= index < cfg.num_scenes:
        raise ValueError(f"synthetic scene index {index} out of range [0, {cfg.num_scenes})")
    names = class_names(cfg.profile)
    rng = np.random.default_rng([cfg.seed, index])
    room = _build_room(cfg.profile, index, rng, cfg.door_p)
    geo = room.finish()

    coord, normal, surface = _sample_points(geo, cfg, rng)
    color = _to_u8(_appearance(geo, surface, coord, normal)[0], rng)
    label = geo.label[surface]
    if cfg.coord_noise > 0:
        coord = coord + rng.normal(0.0, cfg.coord_noise, coord.shape)
    tags = np.zeros(len(names), np.uint8)
    tags[np.unique(label[label != IGNORE_LABEL])] = 1

    scene = {
        "scene_id": _scene_id(index),
        "split": _split(cfg, index),
        "coord": coord.astype(np.float32),
        "color": color,
        "normal": normal.astype(np.float32),
        "label": label.astype(np.uint8),
        "instance": geo.instance[surface].astype(np.int32),
        "tags": tags,
    }
    scene.update(_render_views(geo, cfg, rng))
    return scene


# --------------------------------------------------------------------------------------------
# Ids and splits
# --------------------------------------------------------------------------------------------


def _scene_id(index: int) -> str:
    return f"synth_{index:04d}"


def _split(cfg: SyntheticConfig, index: int) -> str:
    num_val = int(cfg.num_scenes * cfg.val_fraction + 0.5)
    if cfg.val_fraction > 0 and cfg.num_scenes > 1:
        num_val = min(max(num_val, 1), cfg.num_scenes - 1)  # keep at least one scene per split
    return "val" if index >= cfg.num_scenes - num_val else "train"


# --------------------------------------------------------------------------------------------
# Appearance: class palettes (RGB 0-255) and texture strengths. Palettes overlap on purpose.
# --------------------------------------------------------------------------------------------

_WOOD = [(150, 110, 75), (180, 150, 110), (110, 80, 55), (200, 175, 135)]
_WHITE = [(235, 232, 225), (220, 220, 215), (245, 245, 242)]
_DARK = [(45, 45, 50), (70, 70, 75)]
_GREY = [(120, 122, 128), (160, 160, 165), (190, 190, 195)]

_PALETTES: dict[str, list[tuple[int, int, int]]] = {
    "wall": [(228, 222, 205), (235, 235, 230), (205, 208, 212), (215, 200, 180), (195, 207, 215),
             (210, 215, 195)],
    "floor": _WOOD + [(120, 120, 125), (200, 195, 185), (160, 150, 135), (90, 85, 80)],
    "ceiling": [(240, 240, 235), (225, 225, 220), (210, 210, 205)],
    "beam": [(232, 230, 222), (215, 210, 200)],
    "column": [(232, 230, 222), (215, 210, 200), (200, 200, 205)],
    "cabinet": _WOOD + _WHITE + [(120, 125, 130)],
    "bed": [(235, 235, 235), (200, 185, 160), (130, 150, 180), (170, 120, 110), (150, 170, 150)],
    "chair": _DARK + _GREY[:2] + _WOOD[:2] + [(60, 80, 140), (150, 50, 45)],
    "sofa": [(120, 120, 125), (140, 100, 70), (70, 90, 130), (200, 190, 170), (90, 60, 50),
             (60, 100, 80)],
    "table": _WOOD + _WHITE[:2] + _DARK[:1],
    "desk": _WOOD + _WHITE[:2] + _DARK[:1] + [(150, 150, 155)],
    "door": _WOOD + _WHITE + [(190, 190, 195)],
    "window": [(185, 205, 225), (225, 232, 238), (150, 170, 190), (240, 240, 240)],
    "bookshelf": _WOOD + _WHITE[:1] + _DARK[:1],
    "picture": [(180, 60, 50), (60, 90, 150), (200, 180, 80), (70, 120, 70), (220, 215, 205),
                (40, 40, 40), (150, 100, 160)],
    "counter": [(210, 208, 200), (90, 90, 95), (170, 150, 120), (140, 140, 140), (50, 50, 55)],
    "curtain": [(220, 210, 190), (120, 140, 170), (160, 60, 60), (235, 235, 235), (150, 160, 130),
                (90, 90, 100)],
    "refrigerator": [(235, 235, 235), (190, 190, 195), (60, 60, 65)],
    "shower curtain": [(235, 235, 240), (190, 210, 230), (220, 220, 200), (200, 170, 190)],
    "toilet": [(240, 240, 240), (230, 230, 225)],
    "sink": [(240, 240, 240), (190, 190, 195), (170, 172, 178)],
    "bathtub": [(240, 240, 240), (230, 230, 225), (225, 230, 235)],
    "otherfurniture": _WOOD[:2] + _GREY[:2] + _DARK[:1] + [(140, 60, 50), (200, 195, 185)],
    "board": [(245, 245, 245), (235, 238, 235), (60, 90, 70)],
    # props (unlabelled in ScanNet, clutter in S3DIS)
    "pillow": [(235, 235, 235), (200, 180, 150), (120, 140, 180), (180, 90, 80)],
    "monitor": [(30, 30, 35), (50, 50, 55), (200, 200, 200)],
    "lamp": [(230, 220, 190), (60, 60, 60), (240, 240, 235)],
    "box": [(170, 140, 100), (200, 200, 200), (80, 80, 90), (150, 60, 50), (60, 110, 150),
            (230, 200, 80)],
    "books": [(150, 60, 50), (60, 90, 150), (180, 170, 140), (70, 110, 70)],
    "whiteboard": [(245, 245, 245), (235, 238, 235)],
    "rug": [(150, 60, 50), (120, 110, 100), (60, 80, 120), (190, 170, 130)],
    "mirror": [(200, 210, 215), (170, 180, 185)],
    "clutter": [(170, 140, 100), (200, 200, 200), (80, 80, 90), (150, 60, 50), (60, 110, 150)],
    # part roles
    "legs": _DARK + [(180, 180, 185)] + _WOOD[:1],
    "frame": _WOOD + _WHITE[:1] + _DARK[:1],
    "metal": [(180, 180, 185), (150, 150, 155), (60, 60, 65)],
}
# Amplitude of the texture waves (colour units); default 0.05.
_TEXTURE = {"wall": 0.03, "ceiling": 0.02, "beam": 0.02, "column": 0.03, "floor": 0.09,
            "picture": 0.3, "books": 0.35, "box": 0.12, "clutter": 0.15, "rug": 0.2,
            "curtain": 0.08, "shower curtain": 0.1, "board": 0.03, "whiteboard": 0.03,
            "bed": 0.07, "sofa": 0.06, "window": 0.06, "metal": 0.03}

_PATTERNED = {"picture", "books", "box", "clutter", "rug", "curtain", "shower curtain", "pillow", "bed"}

# Kinds without a class of their own: ScanNet leaves them unlabelled, S3DIS calls them clutter.
_S3DIS_RENAME = {"bookshelf": "bookcase", "books": "bookcase", "desk": "table", "whiteboard": "board"}


def _labeller(profile: str):
    index = {name: i for i, name in enumerate(class_names(profile))}
    if profile == "s3dis13":
        return lambda kind: index.get(_S3DIS_RENAME.get(kind, kind), index["clutter"])
    return lambda kind: index.get(kind, IGNORE_LABEL)


# --------------------------------------------------------------------------------------------
# Room building: objects made of primitives, placed without collisions
# --------------------------------------------------------------------------------------------


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


class _Object:
    """One object instance: parts are given in its local frame (x along its width, +y = front,
    z up from its base), and all share its class, instance id and colours."""

    def __init__(self, room: "_Room", kind: str, x: float, y: float, yaw: float, z: float,
                 like: "_Object | None" = None) -> None:
        self.room, self.kind = room, kind
        self.x, self.y, self.z, self.yaw = float(x), float(y), float(z), float(yaw)
        self.label = room.label_of(kind)
        self.instance = room.new_instance()
        # like: another instance of the same set (kitchen units, a table's chairs) shares colours
        self._colours: dict[str, np.ndarray] = like._colours if like is not None else {}

    def to_world(self, lx: float, ly: float) -> tuple[float, float]:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return self.x + c * lx - s * ly, self.y + s * lx + c * ly

    def colour(self, role: str) -> np.ndarray:
        if role not in self._colours:
            self._colours[role] = self.room.draw_colour(self.kind if role == "main" else role)
        return self._colours[role]

    def box(self, cx, cy, z0, sx, sy, sz, role: str = "main") -> None:
        """A box part: centre (cx, cy) in the object frame, bottom at z0, full sizes sx, sy, sz."""
        wx, wy = self.to_world(cx, cy)
        self.room.add_prim(BOX, (wx, wy, self.z + z0 + sz / 2), (sx / 2, sy / 2, sz / 2), self.yaw,
                           self, role)

    def cyl(self, cx, cy, z0, radius, height, role: str = "main") -> None:
        """A vertical cylinder part: axis at (cx, cy) in the object frame, bottom at z0."""
        wx, wy = self.to_world(cx, cy)
        self.room.add_prim(CYLINDER, (wx, wy, self.z + z0 + height / 2), (radius, radius, height / 2),
                           0.0, self, role)


class _Room:
    """Collects the primitives of one room while the builders place objects in it.

    Wall sides: 0 is x=0, 1 is x=Lx, 2 is y=0, 3 is y=Ly. A position on a wall is (side, s) with s
    the coordinate along the wall; ``wall_pose`` turns it into an object pose facing the room.
    """

    def __init__(self, rng: np.random.Generator, profile: str, size, ceiling: bool) -> None:
        self.rng = rng
        self.size = tuple(float(v) for v in size)
        self.ceiling = ceiling
        self.label_of = _labeller(profile)
        self.prims: list[tuple] = []
        self.surfaces: list[tuple] = []
        self.num_instances = 0
        self.footprints: list[tuple[float, float, float, float]] = []
        self.door_p = 1.0  # see SyntheticConfig.door_p
        self.wall_spans: list[list[tuple[float, float, float, float]]] = [[], [], [], []]
        lx, ly, lz = self.size
        self.light = (lx * rng.uniform(0.3, 0.7), ly * rng.uniform(0.3, 0.7), lz - 0.3)
        # the shell: four wall sides of one paint (one instance each), the floor, the ceiling
        paint = self.draw_colour("wall")
        walls = [(self.label_of("wall"), self.new_instance(),
                  np.clip(paint + rng.normal(0, 0.01, 3), 0, 1), self.texture("wall")) for _ in range(4)]
        floor = (self.label_of("floor"), self.new_instance(), self.draw_colour("floor"),
                 self.texture("floor"))
        top = (self.label_of("ceiling") if ceiling else IGNORE_LABEL,
               self.new_instance() if ceiling else -1, self.draw_colour("ceiling"), self.texture("ceiling"))
        self.shell = walls + [floor, top]

    # -- instances, colours, textures ---------------------------------------------------------

    def new_instance(self) -> int:
        self.num_instances += 1
        return self.num_instances - 1

    def draw_colour(self, kind: str) -> np.ndarray:
        palette = _PALETTES[kind]
        base = np.array(palette[self.rng.integers(len(palette))], float) / 255.0
        return np.clip(base * self.rng.uniform(0.85, 1.12) + self.rng.normal(0, 0.04, 3), 0.0, 1.0)

    def texture(self, kind: str):
        """(freq (K,3), phase (K,), amp (K,3)): a few sinusoids of the 3D position."""
        strength = _TEXTURE.get(kind, 0.05)
        k = TEXTURE_WAVES
        direction = self.rng.normal(size=(k, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = np.exp(self.rng.uniform(math.log(0.04), math.log(0.8), k))
        freq = direction * (2 * math.pi / wavelength)[:, None]
        phase = self.rng.uniform(0, 2 * math.pi, k)
        chroma = 0.6 if kind in _PATTERNED else 0.2
        grey = self.rng.uniform(0.4, 1.0, (k, 1))  # brightness waves, plus some hue for patterns
        amp = strength * (grey + chroma * self.rng.normal(size=(k, 3))) / math.sqrt(k)
        return freq, phase, amp

    # -- primitives ---------------------------------------------------------------------------

    def add_object(self, kind: str, x: float, y: float, yaw: float, z: float = 0.0,
                   like: _Object | None = None) -> _Object:
        return _Object(self, kind, x, y, yaw, z, like)

    def add_prim(self, kind: int, center, half, yaw: float, obj: _Object, role: str) -> None:
        self.prims.append((kind, center, half, yaw))
        self.surfaces.append((obj.label, obj.instance, obj.colour(role),
                              self.texture(obj.kind if role == "main" else role)))

    def finish(self) -> _Geometry:
        return _Geometry(self)

    # -- placement ----------------------------------------------------------------------------

    def wall_length(self, side: int) -> float:
        return self.size[1] if side < 2 else self.size[0]

    def wall_pose(self, side: int, s: float, offset: float) -> tuple[float, float, float]:
        """(x, y, yaw) of a point ``offset`` metres in front of wall ``side`` at ``s``, facing in."""
        lx, ly, _ = self.size
        return [(offset, s, -math.pi / 2), (lx - offset, s, math.pi / 2),
                (s, offset, 0.0), (s, ly - offset, math.pi)][side]

    @staticmethod
    def footprint(x, y, w, d, yaw, grow: float = 0.0) -> tuple[float, float, float, float]:
        """Axis-aligned floor rectangle (x0, y0, x1, y1) around a w x d object turned by yaw."""
        c, s = abs(math.cos(yaw)), abs(math.sin(yaw))
        ex, ey = c * w / 2 + s * d / 2 + grow, s * w / 2 + c * d / 2 + grow
        return x - ex, y - ey, x + ex, y + ey

    def floor_free(self, fp, gap: float = 0.05) -> bool:
        x0, y0, x1, y1 = fp
        lx, ly, _ = self.size
        if x0 < -1e-6 or y0 < -1e-6 or x1 > lx + 1e-6 or y1 > ly + 1e-6:
            return False
        return all(x1 + gap <= a0 or a1 + gap <= x0 or y1 + gap <= b0 or b1 + gap <= y0
                   for a0, b0, a1, b1 in self.footprints)

    def wall_free(self, side: int, s0, s1, z0, z1, gap: float = 0.08) -> bool:
        if s0 < 0.12 or s1 > self.wall_length(side) - 0.12:  # keep clear of the corners
            return False
        return all(s1 + gap <= a0 or a1 + gap <= s0 or z1 + gap <= c0 or c1 + gap <= z0
                   for a0, a1, c0, c1 in self.wall_spans[side])

    def against_wall(self, width, depth, height, clearance: float = 0.0, sides=(0, 1, 2, 3),
                     tries: int = 40):
        """Find and reserve a wall spot for a width x depth x height object standing on the floor
        with its back to the wall; clearance = free floor depth kept in front. (side, s) or None."""
        for _ in range(tries):
            side = int(self.rng.choice(sides))
            length = self.wall_length(side)
            if length < width + 0.3:
                continue
            s = self.rng.uniform(0.15 + width / 2, length - 0.15 - width / 2)
            x, y, yaw = self.wall_pose(side, s, (depth + clearance) / 2)
            fp = self.footprint(x, y, width, depth + clearance, yaw)
            if self.floor_free(fp) and self.wall_free(side, s - width / 2, s + width / 2, 0.0, height):
                self.footprints.append(fp)
                self.wall_spans[side].append((s - width / 2, s + width / 2, 0.0, height))
                return side, s
        return None

    def on_wall(self, width, z0, z1, sides=(0, 1, 2, 3), tries: int = 40):
        """Find and reserve a spot on a wall for a flat object spanning z0..z1. (side, s) or None."""
        for _ in range(tries):
            side = int(self.rng.choice(sides))
            length = self.wall_length(side)
            if length < width + 0.3:
                continue
            s = self.rng.uniform(0.15 + width / 2, length - 0.15 - width / 2)
            if self.wall_free(side, s - width / 2, s + width / 2, z0, z1):
                self.wall_spans[side].append((s - width / 2, s + width / 2, z0, z1))
                return side, s
        return None

    def free_spot(self, w, d, yaw, margin: float = 0.3, tries: int = 40):
        """Find and reserve a free floor spot (x, y) for a w x d footprint, margin from walls."""
        lx, ly, _ = self.size
        for _ in range(tries):
            x0, y0, x1, y1 = self.footprint(0.0, 0.0, w, d, yaw)
            if lx - 2 * margin <= x1 - x0 or ly - 2 * margin <= y1 - y0:
                return None
            x = self.rng.uniform(margin - x0, lx - margin - x1)
            y = self.rng.uniform(margin - y0, ly - margin - y1)
            fp = self.footprint(x, y, w, d, yaw)
            if self.floor_free(fp):
                self.footprints.append(fp)
                return x, y
        return None


# --------------------------------------------------------------------------------------------
# Object catalogue (local frame: x = width, +y = front, z = height above the object's base)
# --------------------------------------------------------------------------------------------


def _u(room: _Room, lo: float, hi: float) -> float:
    return float(room.rng.uniform(lo, hi))


def _chance(room: _Room, p: float) -> bool:
    return bool(room.rng.random() < p)


def _make_table(room, x, y, yaw, w, d, h, kind="table", round_top=False) -> _Object:
    o = room.add_object(kind, x, y, yaw)
    top = _u(room, 0.025, 0.05)
    if round_top:
        o.cyl(0, 0, h - top, w / 2, top)
        o.cyl(0, 0, 0, _u(room, 0.04, 0.07), h - top, "legs")
        o.cyl(0, 0, 0, w * _u(room, 0.2, 0.3), 0.03, "legs")
        return o
    o.box(0, 0, h - top, w, d, top)
    leg = _u(room, 0.04, 0.07)
    inset = leg / 2 + _u(room, 0.01, 0.08)
    for sx in (-1, 1):
        for sy in (-1, 1):
            o.box(sx * (w / 2 - inset), sy * (d / 2 - inset), 0, leg, leg, h - top, "legs")
    return o


def _make_desk(room, x, y, yaw, w, d, h, kind="desk") -> _Object:
    o = _make_table(room, x, y, yaw, w, d, h, kind=kind)
    if _chance(room, 0.6):  # drawer block on one side
        side = 1 if _chance(room, 0.5) else -1
        o.box(side * (w / 2 - 0.22), 0, 0, 0.4, d - 0.04, h - 0.05)
    if _chance(room, 0.5):  # modesty panel at the back
        o.box(0, -d / 2 + 0.02, 0.3, w - 0.12, 0.02, h - 0.35)
    return o


def _make_chair(room, x, y, yaw, office: bool | None = None, like: _Object | None = None) -> _Object:
    o = room.add_object("chair", x, y, yaw, like=like)
    sw, sd, sh = _u(room, 0.42, 0.52), _u(room, 0.42, 0.5), _u(room, 0.42, 0.48)
    seat = 0.05
    if office is None:
        office = _chance(room, 0.4)
    if office:
        o.cyl(0, 0, 0, _u(room, 0.24, 0.3), 0.05, "legs")
        o.cyl(0, 0, 0.05, 0.03, sh - seat - 0.05, "legs")
    else:
        for sx in (-1, 1):
            for sy in (-1, 1):
                o.box(sx * (sw / 2 - 0.025), sy * (sd / 2 - 0.025), 0, 0.035, 0.035, sh - seat, "legs")
    o.box(0, 0, sh - seat, sw, sd, seat)
    o.box(0, -sd / 2 + 0.025, sh, sw, 0.05, _u(room, 0.3, 0.5))  # back rest, behind the sitter
    if _chance(room, 0.2):  # arm rests
        for sx in (-1, 1):
            o.box(sx * (sw / 2 - 0.025), 0.02, sh + 0.18, 0.05, sd * 0.8, 0.04, "legs")
    return o


def _make_sofa(room, x, y, yaw, w, d) -> _Object:
    o = room.add_object("sofa", x, y, yaw)
    base, back, arm = _u(room, 0.38, 0.45), _u(room, 0.15, 0.25), _u(room, 0.12, 0.22)
    o.box(0, 0, 0, w, d, base)
    o.box(0, -d / 2 + back / 2, base, w, back, _u(room, 0.3, 0.45))
    arm_h = _u(room, 0.15, 0.25)
    for sx in (-1, 1):
        o.box(sx * (w / 2 - arm / 2), back / 2, base, arm, d - back, arm_h)
    if _chance(room, 0.6):  # seat cushion
        o.box(0, back / 2 + 0.01, base, w - 2 * arm - 0.02, d - back - 0.04, 0.07)
    return o


def _make_cabinet(room, x, y, yaw, w, d, h, z=0.0, kind="cabinet", like=None) -> _Object:
    o = room.add_object(kind, x, y, yaw, z, like)
    o.box(0, 0, 0, w, d, h)
    doors = max(1, round(w / 0.5))
    handle_z = h - 0.15 if h < 1.2 else h * 0.5
    for i in range(doors):  # handles on the front
        o.box((i + 0.5) * w / doors - w / 2, d / 2 + 0.01, handle_z - 0.06, 0.02, 0.02, 0.12, "metal")
    return o


def _make_bookshelf(room, x, y, yaw, w, d, h, kind="bookshelf") -> _Object:
    o = room.add_object(kind, x, y, yaw)
    t = 0.02
    o.box(-w / 2 + t / 2, 0, 0, t, d, h)
    o.box(w / 2 - t / 2, 0, 0, t, d, h)
    o.box(0, -d / 2 + t / 2, 0, w - 2 * t, t, h)
    shelves = max(2, int(h / 0.35))
    step = (h - t) / shelves
    for i in range(shelves + 1):
        o.box(0, t / 2, i * step, w - 2 * t, d - t, t)
    for i in range(shelves):  # rows of books (a prop of their own)
        if _chance(room, 0.75):
            bw = (w - 2 * t) * _u(room, 0.3, 0.95)
            bx = _u(room, -(w - 2 * t - bw) / 2, (w - 2 * t - bw) / 2)
            bd = (d - t) * _u(room, 0.6, 0.9)
            wx, wy = o.to_world(bx, -d / 2 + t + bd / 2)
            books = room.add_object("books", wx, wy, yaw, i * step + t)
            books.box(0, 0, 0, bw, bd, (step - t) * _u(room, 0.6, 0.9))
    return o


def _make_bed(room, x, y, yaw, w, length) -> _Object:
    """Head at -y (against the wall), foot towards +y."""
    o = room.add_object("bed", x, y, yaw)
    frame, mattress = _u(room, 0.2, 0.35), _u(room, 0.18, 0.26)
    o.box(0, 0, 0, w, length, frame, "frame")
    o.box(0, 0.02, frame, w - 0.04, length - 0.06, mattress)
    if _chance(room, 0.8):
        o.box(0, -length / 2 + 0.03, 0, w + 0.04, 0.06, _u(room, 0.8, 1.2), "frame")
    pillows = 2 if w > 1.2 else 1
    for i in range(pillows):
        px = (i + 0.5) * w / pillows - w / 2
        wx, wy = o.to_world(px, -length / 2 + 0.3)
        p = room.add_object("pillow", wx, wy, yaw + _u(room, -0.1, 0.1), frame + mattress)
        p.box(0, 0, 0, min(0.6, w / pillows - 0.1), 0.35, 0.12)
    return o


def _add_door(room: _Room, sides=(0, 1, 2, 3)) -> bool:
    """A closed door flat on a wall, with free floor in front of it (in room.door_p of the rooms)."""
    if not _chance(room, room.door_p):
        return False
    w, h = _u(room, 0.8, 0.95), _u(room, 2.0, 2.1)
    spot = room.against_wall(w, 0.04, h, clearance=0.9, sides=sides)
    if spot is None:
        return False
    x, y, yaw = room.wall_pose(spot[0], spot[1], 0.02)
    door = room.add_object("door", x, y, yaw)
    door.box(0, 0, 0, w, 0.04, h)
    door.box(w / 2 - 0.1, 0.035, 1.0, 0.1, 0.03, 0.03, "metal")  # handle
    return True


def _add_window(room: _Room, curtain_p: float, sides=(0, 1, 2, 3)) -> bool:
    w, sill = _u(room, 0.7, 2.0), _u(room, 0.7, 1.0)
    h = min(_u(room, 1.0, 1.6), room.size[2] - sill - 0.25)
    spot = room.on_wall(w, sill - 0.05, sill + h, sides=sides)
    if spot is None:
        return False
    side, s = spot
    x, y, yaw = room.wall_pose(side, s, 0.015)
    o = room.add_object("window", x, y, yaw, sill)
    o.box(0, 0, 0, w, 0.03, h)
    o.box(0, 0.045, -0.03, w + 0.1, 0.12, 0.03, "frame")  # sill
    window_span = room.wall_spans[side].pop()  # curtains may overlap their own window
    for sign in (-1, 1):  # curtains beside the window, hanging from a rod above it
        if not _chance(room, curtain_p):
            continue
        cw = _u(room, 0.25, 0.6)
        cs = s + sign * (w / 2 + cw / 2 - _u(room, 0.0, 0.15))
        top = min(sill + h + 0.15, room.size[2] - 0.05)
        bottom = 0.02 if _chance(room, 0.6) else sill - 0.15
        cx, cy, _ = room.wall_pose(side, cs, 0.1)
        floor_fp = room.footprint(cx, cy, cw, 0.2, yaw)
        if bottom < 0.1 and not room.floor_free(floor_fp, gap=0.0):
            bottom = sill - 0.15  # furniture below: a short curtain
        if not room.wall_free(side, cs - cw / 2, cs + cw / 2, bottom, top, gap=0.0):
            continue
        room.wall_spans[side].append((cs - cw / 2, cs + cw / 2, bottom, top))
        if bottom < 0.1:
            room.footprints.append(floor_fp)
        c = room.add_object("curtain", cx, cy, yaw, bottom)
        c.box(0, 0, 0, cw, 0.06, top - bottom)
    room.wall_spans[side].append(window_span)
    return True


def _add_flat_on_wall(room: _Room, kind: str, w, h, zc, thickness=0.025, sides=(0, 1, 2, 3)):
    """Pictures, boards, mirrors: a thin box flat on a wall."""
    spot = room.on_wall(w, zc - h / 2, zc + h / 2, sides=sides)
    if spot is None:
        return None
    x, y, yaw = room.wall_pose(spot[0], spot[1], thickness / 2)
    o = room.add_object(kind, x, y, yaw, zc - h / 2)
    o.box(0, 0, 0, w, thickness, h)
    return o


def _add_pictures(room: _Room, count: int) -> None:
    for _ in range(count):
        w, h = _u(room, 0.3, 1.2), _u(room, 0.3, 0.9)
        _add_flat_on_wall(room, "picture", w, h, _u(room, 1.25, 1.8), thickness=_u(room, 0.02, 0.05))


def _add_items_on(room: _Room, host: _Object, top_z: float, w: float, d: float, count: int,
                  kind: str = "box") -> None:
    """Small props (boxes, bottles) standing on a host's top surface of w x d."""
    for _ in range(count):
        iw, idp = _u(room, 0.06, min(0.4, w * 0.5)), _u(room, 0.06, min(0.35, d * 0.6))
        lx = _u(room, -(w - iw) / 2, (w - iw) / 2)
        ly = _u(room, -(d - idp) / 2, (d - idp) / 2)
        wx, wy = host.to_world(lx, ly)
        item = room.add_object(kind, wx, wy, host.yaw + _u(room, -0.4, 0.4), top_z)
        if _chance(room, 0.3):
            item.cyl(0, 0, 0, min(iw, idp) / 2, _u(room, 0.08, 0.3))
        else:
            item.box(0, 0, 0, iw, idp, _u(room, 0.03, 0.3))


def _add_table_with_chairs(room: _Room, w_range=(0.8, 1.8), d_range=(0.7, 1.0), kind="table",
                           chair_p: float = 0.8, round_p: float = 0.25,
                           along_room: bool = False) -> _Object | None:
    """A free-standing table with chairs around it; along_room: its length follows the room's."""
    round_top = _chance(room, round_p)
    w = _u(room, *w_range)
    d = w if round_top else min(_u(room, *d_range), w)
    h = _u(room, 0.7, 0.78)
    if along_room:
        yaw = 0.0 if room.size[0] >= room.size[1] else math.pi / 2
    else:
        yaw = math.pi / 2 if _chance(room, 0.5) else 0.0
    yaw += _u(room, -0.1, 0.1)
    for _ in range(3):  # shrink the table when it does not fit
        spot = room.free_spot(w + 1.1, d + 1.1, yaw)  # room for the chairs around it
        if spot is not None:
            break
        w, d = w * 0.8, d * 0.8
    if spot is None:
        return None
    table = _make_table(room, spot[0], spot[1], yaw, w, d, h, kind=kind, round_top=round_top)
    seats: list[tuple[float, float, float]] = []  # (local x, local y, chair yaw relative to table)
    if round_top:
        n = max(2, int(math.pi * w / 0.6))
        start = _u(room, 0, 2 * math.pi)
        for i in range(n):
            a = start + 2 * math.pi * i / n
            r = w / 2 + 0.22
            seats.append((r * math.cos(a), r * math.sin(a), a + math.pi / 2))
    else:
        n = max(1, int(w / 0.65))
        for i in range(n):
            lx = (i + 0.5) * w / n - w / 2
            seats += [(lx, d / 2 + 0.25, math.pi), (lx, -d / 2 - 0.25, 0.0)]
        if d > 0.75:
            seats += [(w / 2 + 0.25, 0.0, math.pi / 2), (-w / 2 - 0.25, 0.0, -math.pi / 2)]
    office, first = _chance(room, 0.4), None
    for lx, ly, rel in seats:
        if _chance(room, chair_p):
            cx, cy = table.to_world(lx + _u(room, -0.05, 0.05), ly + _u(room, -0.05, 0.1))
            chair = _make_chair(room, cx, cy, yaw + rel + _u(room, -0.25, 0.25), office, like=first)
            first = first or chair
    if _chance(room, 0.5):
        _add_items_on(room, table, h, w * 0.7, d * 0.7, int(room.rng.integers(1, 4)))
    return table


def _add_desk_with_chair(room: _Room, kind="desk", monitor_p: float = 0.6) -> bool:
    w, d, h = _u(room, 1.0, 1.8), _u(room, 0.6, 0.8), _u(room, 0.72, 0.78)
    spot = room.against_wall(w, d, h + 0.5, clearance=0.75)
    if spot is None:
        return False
    side, s = spot
    x, y, yaw = room.wall_pose(side, s, d / 2)
    desk = _make_desk(room, x, y, yaw, w, d, h, kind=kind)
    if _chance(room, monitor_p):
        wx, wy = desk.to_world(_u(room, -w / 4, w / 4), -d / 2 + 0.2)
        mon = room.add_object("monitor", wx, wy, yaw + _u(room, -0.2, 0.2), h)
        mon.cyl(0, 0, 0, 0.1, 0.02)
        mon.box(0, 0, 0.02, 0.04, 0.04, 0.12)
        mon.box(0, 0.03, 0.12, _u(room, 0.45, 0.65), 0.03, _u(room, 0.3, 0.4))
    if _chance(room, 0.4):
        _add_items_on(room, desk, h, w * 0.8, d * 0.6, int(room.rng.integers(1, 3)))
    if _chance(room, 0.9):
        cx, cy, _ = room.wall_pose(side, s + _u(room, -0.2, 0.2), d + _u(room, 0.2, 0.4))
        _make_chair(room, cx, cy, yaw + math.pi + _u(room, -0.4, 0.4))
    return True


def _add_cabinet_on_wall_floor(room: _Room, w_range, d_range, h_range, kind="cabinet"):
    w, d, h = _u(room, *w_range), _u(room, *d_range), _u(room, *h_range)
    spot = room.against_wall(w, d, h, clearance=0.3)
    if spot is None:
        return None
    x, y, yaw = room.wall_pose(spot[0], spot[1], d / 2)
    return _make_cabinet(room, x, y, yaw, w, d, h, kind=kind), h, w, d


def _add_bookshelf(room: _Room, kind="bookshelf") -> bool:
    w, d, h = _u(room, 0.7, 1.3), _u(room, 0.28, 0.4), _u(room, 1.0, 2.1)
    spot = room.against_wall(w, d, h, clearance=0.3)
    if spot is None:
        return False
    x, y, yaw = room.wall_pose(spot[0], spot[1], d / 2)
    _make_bookshelf(room, x, y, yaw, w, d, h, kind=kind)
    return True


def _add_otherfurniture(room: _Room, kind: str = "otherfurniture") -> bool:
    """A stool, side table, bin, coat rack or low shelf unit."""
    variant = int(room.rng.integers(4))
    if variant == 0:  # side table / low shelf against a wall
        w, d, h = _u(room, 0.4, 1.2), _u(room, 0.3, 0.5), _u(room, 0.4, 0.9)
        spot = room.against_wall(w, d, h, clearance=0.2)
        if spot is None:
            return False
        x, y, yaw = room.wall_pose(spot[0], spot[1], d / 2)
        o = room.add_object(kind, x, y, yaw)
        o.box(0, 0, 0, w, d, h)
        o.box(0, 0, h, w + 0.04, d + 0.02, 0.03, "frame")
        return True
    r, h = (_u(room, 0.15, 0.22), _u(room, 0.3, 0.6)) if variant != 3 else (0.25, _u(room, 1.6, 1.9))
    spot = room.free_spot(2 * r, 2 * r, 0.0, margin=0.15)
    if spot is None:
        return False
    o = room.add_object(kind, spot[0], spot[1], 0.0)
    if variant == 1:  # bin
        o.cyl(0, 0, 0, r, h)
    elif variant == 2:  # stool
        o.cyl(0, 0, 0, r * 0.8, 0.03, "legs")
        o.cyl(0, 0, 0.03, 0.03, h - 0.05, "legs")
        o.cyl(0, 0, h - 0.02, r, 0.05)
    else:  # coat rack
        o.cyl(0, 0, 0, r, 0.03, "legs")
        o.cyl(0, 0, 0.03, 0.02, h, "legs")
        o.cyl(0, 0, h - 0.3, 0.12, 0.25)  # hanging coats
    return True


def _add_rug(room: _Room) -> None:
    lx, ly, _ = room.size
    w, d = _u(room, 1.0, min(3.0, lx - 0.8)), _u(room, 0.8, min(2.2, ly - 0.8))
    if w <= 0.5 or d <= 0.5:
        return
    x, y = _u(room, 0.4 + w / 2, lx - 0.4 - w / 2), _u(room, 0.4 + d / 2, ly - 0.4 - d / 2)
    room.add_object("rug", x, y, 0.0).box(0, 0, 0, w, d, 0.012)


def _add_lamp(room: _Room, x: float, y: float, z: float) -> None:
    lamp = room.add_object("lamp", x, y, 0.0, z)
    lamp.cyl(0, 0, 0, 0.08, 0.03)
    lamp.cyl(0, 0, 0.03, 0.015, 0.3)
    lamp.cyl(0, 0, 0.3, 0.13, 0.2)


# --------------------------------------------------------------------------------------------
# Room types
# --------------------------------------------------------------------------------------------


def _bedroom(room: _Room) -> None:
    _add_door(room)
    for _ in range(int(room.rng.integers(1, 3))):
        _add_window(room, curtain_p=0.7)
    w, length = _u(room, 0.9, 1.8), _u(room, 1.95, 2.15)
    nightstand = _u(room, 0.4, 0.55)
    spot = room.against_wall(w + 2 * (nightstand + 0.05), length, 1.2, clearance=0.5)
    if spot is not None:
        side, s = spot
        x, y, yaw = room.wall_pose(side, s, length / 2)
        _make_bed(room, x, y, yaw, w, length)
        for sign in (-1, 1):
            if _chance(room, 0.75):
                nx, ny, _ = room.wall_pose(side, s + sign * (w / 2 + 0.05 + nightstand / 2), 0.22)
                h = _u(room, 0.45, 0.65)
                stand = _make_cabinet(room, nx, ny, yaw, nightstand, 0.42, h)
                if _chance(room, 0.6):
                    _add_lamp(room, *stand.to_world(0.0, 0.0), h)
    if _chance(room, 0.75):  # wardrobe or dresser
        _add_cabinet_on_wall_floor(room, (0.8, 1.6), (0.45, 0.6), (0.8, 2.1))
    if _chance(room, 0.5):
        _add_desk_with_chair(room)
    if _chance(room, 0.3):
        _add_bookshelf(room)
    if _chance(room, 0.4):
        _add_otherfurniture(room)
    if _chance(room, 0.35):
        _add_rug(room)
    _add_pictures(room, int(room.rng.integers(0, 3)))


def _living_room(room: _Room) -> None:
    _add_door(room)
    for _ in range(int(room.rng.integers(1, 4))):
        _add_window(room, curtain_p=0.6)
    for i in range(1 if _chance(room, 0.7) else 2):
        w, d = _u(room, 1.5, 2.4), _u(room, 0.8, 0.95)
        spot = room.against_wall(w, d, 0.9, clearance=0.9 if i == 0 else 0.3)
        if spot is None:
            continue
        side, s = spot
        x, y, yaw = room.wall_pose(side, s, d / 2)
        _make_sofa(room, x, y, yaw, w, d)
        if i == 0 and _chance(room, 0.8):  # coffee table in front of the sofa
            cx, cy, _ = room.wall_pose(side, s, d + 0.45)
            tw = min(w * 0.7, 1.3)
            table = _make_table(room, cx, cy, yaw, tw, 0.55, _u(room, 0.35, 0.48))
            if _chance(room, 0.5):
                _add_items_on(room, table, 0.4, tw * 0.6, 0.4, 1)
    if _chance(room, 0.7):  # TV stand with a TV
        made = _add_cabinet_on_wall_floor(room, (1.0, 2.0), (0.35, 0.5), (0.4, 0.6))
        if made is not None:
            stand, h, w, _ = made
            tx, ty = stand.to_world(0, -0.05)
            tv = room.add_object("monitor", tx, ty, stand.yaw, h)
            tv.box(0, 0, 0, 0.3, 0.15, 0.05)
            tv.box(0, 0, 0.05, min(w, _u(room, 0.9, 1.4)), 0.05, _u(room, 0.5, 0.75))
    for _ in range(int(room.rng.integers(0, 3))):  # armchairs
        spot = room.free_spot(0.8, 0.8, 0.0, margin=0.4)
        if spot is not None:
            _make_chair(room, spot[0], spot[1], _u(room, 0, 2 * math.pi), office=False)
    if _chance(room, 0.4):
        _add_bookshelf(room)
    if _chance(room, 0.4):
        _add_otherfurniture(room)
    if _chance(room, 0.4):
        _add_rug(room)
    if _chance(room, 0.3):
        spot = room.free_spot(0.4, 0.4, 0.0, margin=0.2)
        if spot is not None:
            _add_lamp(room, spot[0], spot[1], 0.0)
    _add_pictures(room, int(room.rng.integers(1, 4)))


def _office(room: _Room) -> None:
    _add_door(room)
    for _ in range(int(room.rng.integers(0, 3))):
        _add_window(room, curtain_p=0.3)
    for _ in range(int(room.rng.integers(1, 4))):
        _add_desk_with_chair(room)
    for _ in range(int(room.rng.integers(0, 3))):
        _add_bookshelf(room)
    if _chance(room, 0.6):  # filing cabinet
        _add_cabinet_on_wall_floor(room, (0.4, 1.0), (0.45, 0.6), (0.7, 1.4))
    if _chance(room, 0.35):
        _add_flat_on_wall(room, "whiteboard", _u(room, 1.2, 2.4), _u(room, 0.9, 1.2), 1.5, 0.02)
    if _chance(room, 0.3):
        _add_table_with_chairs(room, (0.8, 1.4), (0.6, 0.9), chair_p=0.5)
    if _chance(room, 0.3):
        _add_otherfurniture(room)
    _add_pictures(room, int(room.rng.integers(0, 3)))


def _kitchen(room: _Room) -> None:
    _add_door(room)
    if _chance(room, 0.6):
        _add_window(room, curtain_p=0.3)
    runs = 1 if _chance(room, 0.6) else 2
    sink_done = False
    for _ in range(runs):  # base cabinets along a wall, a counter on top, wall cabinets above
        length = _u(room, 1.2, 3.5)
        depth, h = _u(room, 0.55, 0.62), _u(room, 0.84, 0.9)
        spot = room.against_wall(length, depth + 0.03, h + 0.04, clearance=0.6)
        if spot is None:
            continue
        side, s = spot
        x0 = s - length / 2
        units = max(1, round(length / _u(room, 0.45, 0.8)))
        first = None
        for i in range(units):  # one cabinet instance per unit, all of one style
            ux, uy, yaw = room.wall_pose(side, x0 + (i + 0.5) * length / units, depth / 2)
            unit = _make_cabinet(room, ux, uy, yaw, length / units - 0.005, depth, h, like=first)
            first = first or unit
        cx, cy, yaw = room.wall_pose(side, s, (depth + 0.03) / 2)
        counter = room.add_object("counter", cx, cy, yaw, h)
        counter.box(0, 0, 0, length, depth + 0.03, 0.04)
        if not sink_done and _chance(room, 0.9):
            sink_done = True
            sx, sy = counter.to_world(_u(room, -length / 2 + 0.35, length / 2 - 0.35), 0.0)
            sink = room.add_object("sink", sx, sy, yaw, h + 0.04)
            sink.box(0, 0.02, 0, 0.6, 0.42, 0.025)
            sink.cyl(0, -0.22, 0, 0.02, _u(room, 0.2, 0.3), "metal")
        elif _chance(room, 0.6):
            _add_items_on(room, counter, h + 0.04, length * 0.8, depth * 0.6, int(room.rng.integers(1, 4)))
        if _chance(room, 0.6) and room.wall_free(side, s - length / 2, s + length / 2, 1.45, 2.2):
            room.wall_spans[side].append((s - length / 2, s + length / 2, 1.45, 2.2))
            for i in range(units):
                ux, uy, yaw = room.wall_pose(side, x0 + (i + 0.5) * length / units, 0.175)
                _make_cabinet(room, ux, uy, yaw, length / units - 0.005, 0.35, 0.7, z=1.45, like=first)
    if _chance(room, 0.85):
        w, d, h = _u(room, 0.65, 0.9), _u(room, 0.65, 0.75), _u(room, 1.6, 1.9)
        spot = room.against_wall(w, d, h, clearance=0.6)
        if spot is not None:
            x, y, yaw = room.wall_pose(spot[0], spot[1], d / 2)
            fridge = room.add_object("refrigerator", x, y, yaw)
            fridge.box(0, 0, 0, w, d, h)
            fridge.box(w / 2 - 0.08, d / 2 + 0.02, h * 0.35, 0.03, 0.04, 0.5, "metal")
    if _chance(room, 0.6):
        _add_table_with_chairs(room, (0.7, 1.6), (0.7, 0.9))
    if _chance(room, 0.3):
        _add_otherfurniture(room)
    _add_pictures(room, int(room.rng.integers(0, 2)))


def _bathroom(room: _Room) -> None:
    _add_door(room)
    if _chance(room, 0.6):  # bathtub with a shower curtain along its open side
        w, d, h = _u(room, 1.4, 1.7), _u(room, 0.7, 0.8), _u(room, 0.5, 0.6)
        spot = room.against_wall(w, d, 2.0, clearance=0.3)
        if spot is not None:
            x, y, yaw = room.wall_pose(spot[0], spot[1], d / 2)
            tub = room.add_object("bathtub", x, y, yaw)
            rim = 0.08
            tub.box(0, 0, 0, w - 2 * rim, d - 2 * rim, 0.12)
            for sy in (-1, 1):
                tub.box(0, sy * (d / 2 - rim / 2), 0, w, rim, h)
            for sx in (-1, 1):
                tub.box(sx * (w / 2 - rim / 2), 0, 0, rim, d - 2 * rim, h)
            if _chance(room, 0.8):
                cw = w * _u(room, 0.35, 1.0)
                cx, cy = tub.to_world((w - cw) / 2 * (1 if _chance(room, 0.5) else -1), d / 2 - 0.02)
                bottom = h + _u(room, 0.1, 0.4)
                curtain = room.add_object("shower curtain", cx, cy, yaw, bottom)
                curtain.box(0, 0, 0, cw, 0.02, _u(room, 1.9, 2.05) - bottom)
    if _chance(room, 0.95):
        spot = room.against_wall(0.45, 0.7, 0.85, clearance=0.3)
        if spot is not None:
            x, y, yaw = room.wall_pose(spot[0], spot[1], 0.35)
            toilet = room.add_object("toilet", x, y, yaw)
            toilet.box(0, -0.25, 0, 0.42, 0.2, _u(room, 0.75, 0.85))
            toilet.cyl(0, 0.08, 0, 0.19, 0.38)
            toilet.cyl(0, 0.08, 0.38, 0.2, 0.03)
    if _chance(room, 0.6):  # vanity: cabinet, counter, sink
        w, d = _u(room, 0.6, 1.1), 0.5
        spot = room.against_wall(w, d + 0.02, 2.0, clearance=0.4)
        if spot is not None:
            side, s = spot
            x, y, yaw = room.wall_pose(side, s, d / 2)
            _make_cabinet(room, x, y, yaw, w, d, 0.8)
            cx, cy, _ = room.wall_pose(side, s, (d + 0.02) / 2)
            room.add_object("counter", cx, cy, yaw, 0.8).box(0, 0, 0, w + 0.02, d + 0.02, 0.04)
            sink = room.add_object("sink", cx, cy, yaw, 0.84)
            sink.box(0, 0.03, 0, 0.45, 0.35, 0.05)
            sink.cyl(0, -0.2, 0, 0.015, 0.15, "metal")
            if _chance(room, 0.6):
                mx, my, _ = room.wall_pose(side, s, 0.01)
                room.add_object("mirror", mx, my, yaw, 1.1).box(0, 0, 0, min(w, 0.8), 0.02, 0.7)
    elif _chance(room, 0.8):  # pedestal sink
        spot = room.against_wall(0.55, 0.45, 2.0, clearance=0.4)
        if spot is not None:
            x, y, yaw = room.wall_pose(spot[0], spot[1], 0.225)
            sink = room.add_object("sink", x, y, yaw)
            sink.cyl(0, 0, 0, 0.09, 0.7)
            sink.box(0, 0, 0.7, 0.55, 0.45, 0.16)
            sink.cyl(0, -0.18, 0.86, 0.015, 0.15, "metal")
    if _chance(room, 0.3):
        _add_window(room, curtain_p=0.3)
    if _chance(room, 0.3):
        _add_cabinet_on_wall_floor(room, (0.4, 0.8), (0.3, 0.45), (0.8, 1.9))
    if _chance(room, 0.4):
        _add_otherfurniture(room)
    _add_pictures(room, int(room.rng.integers(0, 2)))


def _conference_room(room: _Room) -> None:
    _add_door(room)
    for _ in range(int(room.rng.integers(0, 4))):
        _add_window(room, curtain_p=0.4)
    lx, ly, _ = room.size
    long_side = max(lx, ly) - 1.6
    _add_table_with_chairs(room, (min(1.8, long_side), max(1.8, min(4.0, long_side))), (1.0, 1.4),
                           chair_p=0.85, round_p=0.1, along_room=True)
    if _chance(room, 0.6):
        _add_flat_on_wall(room, "whiteboard", _u(room, 1.2, 2.4), _u(room, 0.9, 1.2), 1.5, 0.02)
    if _chance(room, 0.3):
        _add_cabinet_on_wall_floor(room, (0.8, 1.8), (0.4, 0.6), (0.7, 1.1))
    if _chance(room, 0.3):
        _add_otherfurniture(room)
    _add_pictures(room, int(room.rng.integers(0, 3)))


def _library(room: _Room) -> None:
    _add_door(room)
    if _chance(room, 0.7):
        _add_window(room, curtain_p=0.5)
    for _ in range(int(room.rng.integers(1, 4))):
        _add_bookshelf(room)
    if _chance(room, 0.6):
        _add_desk_with_chair(room, monitor_p=0.3)
    if _chance(room, 0.5):
        w, d = _u(room, 1.4, 2.2), _u(room, 0.8, 0.95)
        spot = room.against_wall(w, d, 0.9, clearance=0.3)
        if spot is not None:
            x, y, yaw = room.wall_pose(spot[0], spot[1], d / 2)
            _make_sofa(room, x, y, yaw, w, d)
    if _chance(room, 0.4):
        _add_table_with_chairs(room, (0.7, 1.4), (0.6, 0.9), chair_p=0.6)
    if _chance(room, 0.3):
        _add_otherfurniture(room)
    _add_pictures(room, int(room.rng.integers(0, 3)))


# S3DIS-13: ceilings everywhere, columns and beams, boards, bookcases, lots of clutter.


def _add_columns_and_beams(room: _Room, column_p: float, beam_p: float) -> None:
    lx, ly, lz = room.size
    for _ in range(int(room.rng.integers(1, 3)) if _chance(room, column_p) else 0):
        cw, cd = _u(room, 0.3, 0.6), _u(room, 0.25, 0.6)
        spot = room.against_wall(cw, cd, lz, clearance=0.1)
        if spot is not None:
            x, y, yaw = room.wall_pose(spot[0], spot[1], cd / 2)
            room.add_object("column", x, y, yaw).box(0, 0, 0, cw, cd, lz)
    if _chance(room, beam_p):
        bw, bd = _u(room, 0.3, 0.5), _u(room, 0.3, 0.6)
        beam = room.add_object("beam", 0.0, 0.0, 0.0, lz - bd)
        if lx < ly:  # across the short direction, like real ceiling beams
            beam.box(lx / 2, _u(room, 0.3 * ly, 0.7 * ly), 0, lx, bw, bd)
        else:
            beam.box(_u(room, 0.3 * lx, 0.7 * lx), ly / 2, 0, bw, ly, bd)


def _add_floor_clutter(room: _Room, count: int) -> None:
    for _ in range(count):
        w, d, h = _u(room, 0.2, 0.7), _u(room, 0.2, 0.6), _u(room, 0.15, 0.9)
        spot = room.against_wall(w, d, h, clearance=0.0)
        if spot is None:
            continue
        x, y, yaw = room.wall_pose(spot[0], spot[1], d / 2)
        room.add_object("clutter", x, y, yaw).box(0, 0, 0, w, d, h)


def _s3dis_office(room: _Room) -> None:
    for _ in range(int(room.rng.integers(1, 3))):
        _add_door(room)
    _add_columns_and_beams(room, 0.5, 0.4)
    if _chance(room, 0.6):
        _add_window(room, curtain_p=0.2)
    for _ in range(int(room.rng.integers(1, 4))):
        _add_desk_with_chair(room, kind="table")
    for _ in range(int(room.rng.integers(0, 3))):
        _add_bookshelf(room)
    if _chance(room, 0.6):
        _add_flat_on_wall(room, "board", _u(room, 1.2, 2.4), _u(room, 0.9, 1.2), 1.5, 0.02)
    if _chance(room, 0.2):
        w, d = _u(room, 1.4, 2.0), _u(room, 0.8, 0.95)
        spot = room.against_wall(w, d, 0.9, clearance=0.3)
        if spot is not None:
            _make_sofa(room, *room.wall_pose(spot[0], spot[1], d / 2), w, d)
    if _chance(room, 0.5):
        _add_cabinet_on_wall_floor(room, (0.4, 1.0), (0.45, 0.6), (0.7, 1.4))
    _add_floor_clutter(room, int(room.rng.integers(0, 4)))
    _add_pictures(room, int(room.rng.integers(0, 3)))


def _s3dis_conference(room: _Room) -> None:
    _add_door(room)
    _add_columns_and_beams(room, 0.3, 0.4)
    if _chance(room, 0.5):
        _add_window(room, curtain_p=0.3)
    lx, ly, _ = room.size
    long_side = max(lx, ly) - 1.6
    _add_table_with_chairs(room, (min(1.8, long_side), max(1.8, min(4.0, long_side))), (1.0, 1.4),
                           chair_p=0.85, round_p=0.1, along_room=True)
    if _chance(room, 0.9):
        _add_flat_on_wall(room, "board", _u(room, 1.5, 3.0), _u(room, 0.9, 1.2), 1.5, 0.02)
    _add_floor_clutter(room, int(room.rng.integers(0, 3)))
    _add_pictures(room, int(room.rng.integers(0, 2)))


def _s3dis_hallway(room: _Room) -> None:
    long_walls = (2, 3) if room.size[0] > room.size[1] else (0, 1)
    for _ in range(int(room.rng.integers(2, 5))):
        _add_door(room, sides=long_walls)
    _add_columns_and_beams(room, 0.5, 0.5)
    if _chance(room, 0.3):
        _add_flat_on_wall(room, "board", _u(room, 1.0, 2.0), _u(room, 0.8, 1.1), 1.5, 0.02)
    if _chance(room, 0.2):
        _add_bookshelf(room)
    _add_floor_clutter(room, int(room.rng.integers(1, 5)))
    _add_pictures(room, int(room.rng.integers(0, 3)))


def _s3dis_lounge(room: _Room) -> None:
    _add_door(room)
    _add_columns_and_beams(room, 0.3, 0.3)
    if _chance(room, 0.7):
        _add_window(room, curtain_p=0.3)
    for _ in range(int(room.rng.integers(1, 3))):
        w, d = _u(room, 1.5, 2.4), _u(room, 0.8, 0.95)
        spot = room.against_wall(w, d, 0.9, clearance=0.4)
        if spot is not None:
            _make_sofa(room, *room.wall_pose(spot[0], spot[1], d / 2), w, d)
    _add_table_with_chairs(room, (0.7, 1.4), (0.6, 0.9), chair_p=0.5, round_p=0.4)
    if _chance(room, 0.3):
        _add_bookshelf(room)
    _add_floor_clutter(room, int(room.rng.integers(0, 3)))
    _add_pictures(room, int(room.rng.integers(0, 3)))


def _s3dis_storage(room: _Room) -> None:
    _add_door(room)
    _add_columns_and_beams(room, 0.3, 0.3)
    for _ in range(int(room.rng.integers(2, 5))):
        _add_bookshelf(room)
    if _chance(room, 0.4):
        _add_table_with_chairs(room, (0.8, 1.4), (0.6, 0.8), chair_p=0.2)
    _add_floor_clutter(room, int(room.rng.integers(2, 7)))


def _s3dis_pantry(room: _Room) -> None:
    _add_door(room)
    if _chance(room, 0.4):
        _add_window(room, curtain_p=0.2)
    length = _u(room, 1.2, 2.5)
    spot = room.against_wall(length, 0.62, 0.95, clearance=0.6)
    if spot is not None:  # a counter run: all clutter in S3DIS terms
        x, y, yaw = room.wall_pose(spot[0], spot[1], 0.3)
        run = _make_cabinet(room, x, y, yaw, length, 0.6, 0.88)
        _add_items_on(room, run, 0.88, length * 0.8, 0.4, int(room.rng.integers(1, 4)))
    _add_table_with_chairs(room, (0.8, 1.6), (0.7, 0.9), chair_p=0.6)
    _add_floor_clutter(room, int(room.rng.integers(0, 3)))
    _add_pictures(room, int(room.rng.integers(0, 2)))


# (name, x range, y range, builder); room heights per profile below.
_ROOM_TYPES = {
    "scannet20": [
        ("bedroom", (3.0, 5.0), (3.0, 4.5), _bedroom),
        ("living_room", (4.0, 7.0), (3.5, 6.0), _living_room),
        ("kitchen", (3.0, 5.5), (2.8, 4.5), _kitchen),
        ("office", (3.0, 6.0), (3.0, 5.0), _office),
        ("bathroom", (2.0, 3.5), (2.0, 3.2), _bathroom),
        ("conference_room", (5.0, 8.0), (3.8, 6.0), _conference_room),
        ("library", (3.0, 5.5), (3.0, 5.0), _library),
    ],
    "s3dis13": [
        ("office", (3.0, 6.0), (3.0, 5.5), _s3dis_office),
        ("conference_room", (5.0, 9.0), (4.0, 7.0), _s3dis_conference),
        ("hallway", (6.0, 12.0), (1.8, 2.6), _s3dis_hallway),
        ("lounge", (4.0, 8.0), (4.0, 7.0), _s3dis_lounge),
        ("storage", (2.5, 4.5), (2.5, 4.0), _s3dis_storage),
        ("pantry", (3.0, 5.0), (2.8, 4.5), _s3dis_pantry),
    ],
}
_ROOM_HEIGHT = {"scannet20": (2.4, 3.0), "s3dis13": (2.8, 3.6)}


def _build_room(profile: str, index: int, rng: np.random.Generator, door_p: float = 1.0) -> _Room:
    _, xr, yr, build = _ROOM_TYPES[profile][index % len(_ROOM_TYPES[profile])]
    size = (rng.uniform(*xr), rng.uniform(*yr), rng.uniform(*_ROOM_HEIGHT[profile]))
    if rng.random() < 0.5:  # either orientation
        size = (size[1], size[0], size[2])
    room = _Room(rng, profile, size, ceiling=profile == "s3dis13")
    room.door_p = door_p
    build(room)
    return room


# --------------------------------------------------------------------------------------------
# Points: area-proportional samples on exposed faces
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Appearance shared by points and pixels
# --------------------------------------------------------------------------------------------


def _appearance(geo: _Geometry, surface: np.ndarray, x: np.ndarray, normal: np.ndarray | None = None):
    """(colour in [0, 1], normal) of points x on the given surfaces: (base + texture(x)) x Lambert
    shading. Points and pixels both come through here, so 2D and 3D colours agree. With
    normal=None (pixel hit points) the normals are computed from the geometry."""
    if normal is None:
        normal = np.empty((len(x), 3), np.float32)
        order = np.argsort(surface, kind="stable")
        for idx in np.split(order, np.flatnonzero(np.diff(surface[order])) + 1):  # per surface
            if idx.size:
                normal[idx] = _normals_on(geo, surface[idx[0]], x[idx])
    # float32 and einsum: this runs on every pixel of every view
    x = x.astype(np.float32, copy=False)
    waves = np.sin(np.einsum("nj,nkj->nk", x, geo.freq[surface]) + geo.phase[surface])
    colour = geo.base[surface] + np.einsum("nk,nkc->nc", waves, geo.amp[surface])
    to_light = geo.light.astype(np.float32) - x
    to_light /= np.sqrt(np.einsum("nc,nc->n", to_light, to_light))[:, None] + 1e-9
    lambert = np.clip(np.einsum("nc,nc->n", normal.astype(np.float32, copy=False), to_light), 0.0, 1.0)
    return colour * (_AMBIENT + (1 - _AMBIENT) * lambert)[:, None], normal


def _to_u8(colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = colour + _COLOR_NOISE * rng.standard_normal(colour.shape, dtype=np.float32)
    return np.clip(noisy * 255.0 + 0.5, 0, 255).astype(np.uint8)


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


# --------------------------------------------------------------------------------------------
# Views: a walking trajectory and exact ray casting
# --------------------------------------------------------------------------------------------


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
