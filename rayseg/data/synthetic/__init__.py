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

Modules, one job each (this package was one file; it is split so that each part can be read and
changed on its own, with no change in the scenes it generates):

- ``layout``: the room being built (``_Room``, ``_Object``), the class profiles (``class_names``,
  which kind gets which label), collision-free placement and the object catalogue (tables,
  chairs, beds, doors, windows, ...).
- ``rooms``: the room types of each profile (bedroom, kitchen, ..., S3DIS hallway, ...) and
  ``_build_room``, which draws a room's size and furnishes it.
- ``geometry``: ``_Geometry``, the finished room as arrays (primitives, surfaces, faces), and the
  geometric queries shared by points and views (inside tests, surface normals).
- ``appearance``: colour palettes and textures, drawn per surface, and the shading and sensor
  noise shared by points and pixels.
- ``sampling``: the point cloud, area-proportional samples on exposed faces.
- ``rendering``: the RGB-D views, camera poses along a loop and exact ray casting.

Random draws happen in one order, on one generator per scene: room size, light and shell, then
the builders (rooms / layout, with their colour and texture draws), points, point colour noise,
coordinate noise, then the views (``generate_scene`` below).
"""

from __future__ import annotations

import numpy as np

from rayseg.config import SyntheticConfig
from rayseg.data.scene import IGNORE_LABEL, PROFILES
from rayseg.data.synthetic.appearance import _appearance, _to_u8
from rayseg.data.synthetic.layout import class_names
from rayseg.data.synthetic.rendering import _render_views, intrinsics
from rayseg.data.synthetic.rooms import _build_room, room_entries
from rayseg.data.synthetic.sampling import _sample_points

__all__ = ["GENERATOR_VERSION", "PROFILES", "class_names", "generate_scene", "intrinsics", "room_type",
           "scene_ids"]

GENERATOR_VERSION = 2
"""Bumped whenever the same SyntheticConfig would generate different scenes (2: doors only in
door_p of the rooms); stored with the settings in the manifest, so `prepare` refuses to top up a
folder made by another version."""


# --------------------------------------------------------------------------------------------
# Public API (class_names: layout.py, intrinsics: rendering.py)
# --------------------------------------------------------------------------------------------


def scene_ids(cfg: SyntheticConfig) -> list[tuple[str, str]]:
    """[(scene_id, split)] for every scene of cfg, in index order. The last scenes are 'val'."""
    return [(_scene_id(i), _split(cfg, i)) for i in range(cfg.num_scenes)]


def room_type(cfg: SyntheticConfig, index: int) -> str:
    """Room type of scene ``index`` (they cycle through the profile's types, or through
    ``cfg.room_types``, so all occur)."""
    entries = room_entries(cfg.profile, tuple(cfg.room_types))
    return entries[index % len(entries)][0]


def generate_scene(cfg: SyntheticConfig, index: int) -> dict:
    """Scene record ``index`` of cfg (see rayseg/data/scene.py), deterministic in (cfg, index)."""
    if not 0 <= index < cfg.num_scenes:
        raise ValueError(f"synthetic scene index {index} out of range [0, {cfg.num_scenes})")
    names = class_names(cfg.profile)
    rng = np.random.default_rng([cfg.seed, index])
    room = _build_room(cfg.profile, index, rng, cfg.door_p, tuple(cfg.room_types), cfg.mix_p)
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
