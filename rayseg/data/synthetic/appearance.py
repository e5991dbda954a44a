"""What surfaces look like: colour palettes, textures, shading and sensor noise.

Each surface gets a base colour drawn from its class palette (palettes overlap between classes)
and a texture, a few 3D sinusoids of the world position (``_draw_colour``, ``_texture``, drawn
while the room is built, see ``_Room`` in layout.py). ``_appearance`` turns them into colours:
(base + texture(x)) x Lambert shading from a point light, and ``_to_u8`` adds sensor noise. Points
(``generate_scene``) and pixels (rendering.py) both come through here, so 2D and 3D colours agree.
"""

from __future__ import annotations

import math

import numpy as np

from rayseg.data.synthetic.geometry import _Geometry, _normals_on

TEXTURE_WAVES = 4
_AMBIENT = 0.4
_COLOR_NOISE = 0.012  # per point / per pixel sensor noise, colour in [0, 1]


# Class palettes (RGB 0-255) and texture strengths. Palettes overlap on purpose.

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


def _draw_colour(rng: np.random.Generator, kind: str) -> np.ndarray:
    """A base colour in [0, 1] for a surface of ``kind``: a palette entry, scaled and jittered."""
    palette = _PALETTES[kind]
    base = np.array(palette[rng.integers(len(palette))], float) / 255.0
    return np.clip(base * rng.uniform(0.85, 1.12) + rng.normal(0, 0.04, 3), 0.0, 1.0)


def _texture(rng: np.random.Generator, kind: str):
    """(freq (K,3), phase (K,), amp (K,3)): a few sinusoids of the 3D position."""
    strength = _TEXTURE.get(kind, 0.05)
    k = TEXTURE_WAVES
    direction = rng.normal(size=(k, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wavelength = np.exp(rng.uniform(math.log(0.04), math.log(0.8), k))
    freq = direction * (2 * math.pi / wavelength)[:, None]
    phase = rng.uniform(0, 2 * math.pi, k)
    chroma = 0.6 if kind in _PATTERNED else 0.2
    grey = rng.uniform(0.4, 1.0, (k, 1))  # brightness waves, plus some hue for patterns
    amp = strength * (grey + chroma * rng.normal(size=(k, 3))) / math.sqrt(k)
    return freq, phase, amp


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
