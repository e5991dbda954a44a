"""Building a room: the class profiles, objects made of primitives, collision-free placement,
and the object catalogue.

A room is the interior box ``[0, Lx] x [0, Ly] x [0, H]`` (its shell: floor, four wall sides and,
in the S3DIS profile, a ceiling) plus solid primitives. ``_Room`` collects them while builders
place objects (``_Object``: several primitives sharing one class, instance and colours) without
collisions, on the floor or on the walls; ``_Room.finish`` freezes it into a ``_Geometry``
(geometry.py). The catalogue below (``_make_*``, ``_add_*``) is what the room types in rooms.py
are furnished with. Objects outside the class set mirror the real data: ScanNet leaves them
unlabelled (IGNORE_LABEL), S3DIS calls them clutter (``_labeller``).
"""

from __future__ import annotations

import math

import numpy as np

from rayseg.data.scene import IGNORE_LABEL, PROFILES
from rayseg.data.synthetic.appearance import _draw_colour, _texture
from rayseg.data.synthetic.geometry import BOX, CYLINDER, _Geometry


# --------------------------------------------------------------------------------------------
# Class profiles
# --------------------------------------------------------------------------------------------


def class_names(profile: str) -> tuple[str, ...]:
    """Class names of a dataset profile ('scannet20' or 's3dis13')."""
    if profile not in PROFILES:
        raise ValueError(f"unknown synthetic profile {profile!r}; known: {sorted(PROFILES)}")
    return PROFILES[profile]


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
        return _draw_colour(self.rng, kind)

    def texture(self, kind: str):
        """(freq (K,3), phase (K,), amp (K,3)): a few sinusoids of the 3D position."""
        return _texture(self.rng, kind)

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
