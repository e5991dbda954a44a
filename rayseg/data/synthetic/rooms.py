"""Room types: what each profile's rooms contain, and ``_build_room``.

Each profile has several room types (bedroom, kitchen, bathroom, office, ...; for S3DIS office,
hallway, storage, ...) with plausible co-occurrences (chairs around tables, nightstands by the
bed, counters on cabinets, curtains beside windows, shower curtains on bathtubs), so scene tags
vary across scenes. The builders furnish a ``_Room`` from the object catalogue of layout.py;
scene ``i`` gets type ``i % len(types)``, where the types are the profile's or
``synthetic.room_types`` (``room_entries``). With ``synthetic.mix_p`` a room is also furnished
by a second type drawn at random from all of the profile's.
"""

from __future__ import annotations

import math

import numpy as np

from rayseg.data.synthetic.layout import (
    _add_bookshelf,
    _add_cabinet_on_wall_floor,
    _add_desk_with_chair,
    _add_door,
    _add_flat_on_wall,
    _add_items_on,
    _add_lamp,
    _add_otherfurniture,
    _add_pictures,
    _add_rug,
    _add_table_with_chairs,
    _add_window,
    _chance,
    _make_bed,
    _make_cabinet,
    _make_chair,
    _make_sofa,
    _make_table,
    _Room,
    _u,
)


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
MIXED_ROOM_SCALE = 1.3  # per horizontal side of a room furnished by two types (synthetic.mix_p)


def room_entries(profile: str, room_types: tuple[str, ...] = ()) -> list:
    """The (name, x range, y range, builder) entries scenes cycle through: all of the profile's, or
    the named ones in the given order (`synthetic.room_types`)."""
    entries = _ROOM_TYPES[profile]
    if not room_types:
        return entries
    known = {e[0]: e for e in entries}
    unknown = [t for t in room_types if t not in known]
    if unknown:
        raise ValueError(f"synthetic.room_types: {unknown} are not {profile} room types; known: {sorted(known)}")
    return [known[t] for t in room_types]


def _build_room(profile: str, index: int, rng: np.random.Generator, door_p: float = 1.0,
                room_types: tuple[str, ...] = (), mix_p: float = 0.0) -> _Room:
    entries = room_entries(profile, room_types)
    _, xr, yr, build = entries[index % len(entries)]
    size = (rng.uniform(*xr), rng.uniform(*yr), rng.uniform(*_ROOM_HEIGHT[profile]))
    if rng.random() < 0.5:  # either orientation
        size = (size[1], size[0], size[2])
    # A mixed room (a studio flat) is 1.3x larger each way and furnished by a second type first,
    # so that type's big pieces (bed, fridge, bathtub) find wall space before the room's own
    # type fills it (second builder last, only small things fitted: measured, tags barely changed).
    # Drawn only when mix_p > 0: the random stream and the scenes of mix_p = 0 are unchanged.
    second = None
    others = [e for e in _ROOM_TYPES[profile] if e[3] is not build]
    if mix_p > 0 and rng.random() < mix_p and others:
        second = others[int(rng.integers(len(others)))][3]
        size = (size[0] * MIXED_ROOM_SCALE, size[1] * MIXED_ROOM_SCALE, size[2])
    room = _Room(rng, profile, size, ceiling=profile == "s3dis13")
    room.door_p = door_p
    if second is not None:
        second(room)
    build(room)
    return room
