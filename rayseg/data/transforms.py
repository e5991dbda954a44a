"""Augmentations, view sampling, voxelisation and Mix3D: plain numpy functions.

Every random function takes an explicit ``np.random.Generator``; nothing reads global random
state, so a sample is a pure function of (scene, config, generator). Point colours are handled
as float arrays in [0, 255] and images as uint8 (V, H, W, 3). Ground-truth keys are never read
here: floor/wall/ceiling removal decides by geometry and regions alone and clears tags by class
name.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageEnhance

from rayseg.data.scene import NO_REGION, SceneError

log = logging.getLogger(__name__)

# Per-point keys of a scene record: removal and subsampling filter all of them together.
# pseudo_label: stage seg's targets (rayseg.pseudo), carried like any per-point key.
POINT_KEYS = ("coord", "color", "normal", "label", "instance", "pseudo_label")


def point_keys(scene: dict) -> list[str]:
    """Keys of `scene` that hold one entry per point."""
    return [k for k in scene if k in POINT_KEYS or k.startswith("region_")]


def select_points(scene: dict, keep: np.ndarray) -> dict:
    """Copy of `scene` with only the points `keep` (bool mask or index array) in every per-point key."""
    out = dict(scene)
    for k in point_keys(scene):
        out[k] = scene[k][keep]
    return out


# --------------------------------------------------------------------------------------------
# Colour of points (float, 0..255)
# --------------------------------------------------------------------------------------------


def chromatic_autocontrast(color: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """With probability p, blend the colours with their per-channel min-max stretched version."""
    if rng.random() >= p:
        return color
    lo = color.min(0, keepdims=True)
    hi = color.max(0, keepdims=True)
    scale = 255.0 / np.maximum(hi - lo, 1e-6)
    stretched = (color - lo) * scale
    blend = rng.random()
    return np.clip((1.0 - blend) * color + blend * stretched, 0.0, 255.0)


def chromatic_translation(color: np.ndarray, rng: np.random.Generator, ratio: float) -> np.ndarray:
    """Shift all colours by one random RGB offset in [-ratio, ratio] x 255."""
    shift = (rng.random(3) - 0.5) * 2.0 * ratio * 255.0
    return np.clip(color + shift, 0.0, 255.0)


def chromatic_jitter(color: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """Per-point Gaussian colour noise, std in units of the full range."""
    noise = rng.standard_normal(color.shape) * (std * 255.0)
    return np.clip(color + noise, 0.0, 255.0)


def hue_saturation_shift(color: np.ndarray, rng: np.random.Generator, hue_max: float,
                         saturation_max: float) -> np.ndarray:
    """Rotate the hue by U(-hue_max, hue_max) of the circle and scale saturation by 1 + U(-s, s).
    Done in PIL's 8-bit HSV (colours are rounded to whole levels, as for the views)."""
    hue = (rng.random() - 0.5) * 2.0 * hue_max
    sat = 1.0 + (rng.random() - 0.5) * 2.0 * saturation_max
    pixels = np.clip(np.rint(color), 0, 255).astype(np.uint8).reshape(-1, 1, 3)
    hsv = np.array(Image.fromarray(pixels, "RGB").convert("HSV"))
    hsv[..., 0] += np.uint8(int(round(hue * 255)) % 256)  # wraps around the hue circle
    hsv[..., 1] = np.clip(np.rint(hsv[..., 1] * sat), 0, 255).astype(np.uint8)
    rgb = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    return rgb.reshape(color.shape).astype(color.dtype)


def chromatic_augment(color: np.ndarray, rng: np.random.Generator, aug) -> np.ndarray:
    """The METHOD.md chromatic chain (aug: AugmentConfig); float colours in [0, 255].
    Translation and jitter each happen with probability aug.chromatic_p (the reference: 0.95)."""
    color = chromatic_autocontrast(color, rng, aug.autocontrast_p)
    if rng.random() < aug.chromatic_p:
        color = chromatic_translation(color, rng, aug.color_translate_ratio)
    if rng.random() < aug.chromatic_p:
        color = chromatic_jitter(color, rng, aug.color_jitter_std)
    return hue_saturation_shift(color, rng, aug.hue_max, aug.saturation_max)


# --------------------------------------------------------------------------------------------
# Geometry (coordinates and normals)
# --------------------------------------------------------------------------------------------


def center(coord: np.ndarray) -> np.ndarray:
    """Move the scene so its x/y bounding-box centre is at 0 and its lowest point at z = 0."""
    lo = coord.min(0)
    hi = coord.max(0)
    shift = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]], dtype=coord.dtype)
    return coord - shift


def random_flip_xy(coord: np.ndarray, normal: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mirror x and y each with probability 0.5 (about the origin)."""
    sign = np.where(rng.random(2) < 0.5, -1.0, 1.0)
    mult = np.array([sign[0], sign[1], 1.0], dtype=coord.dtype)
    return coord * mult, normal * mult.astype(normal.dtype)


def rotate_z(coord: np.ndarray, normal: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate points and normals by `angle` radians about the z axis."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return (coord @ rot.T).astype(coord.dtype), (normal @ rot.T).astype(normal.dtype)


def random_rotate_z(coord: np.ndarray, normal: np.ndarray, rng: np.random.Generator,
                    max_angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate about z by an angle drawn uniformly in [-max_angle, max_angle]."""
    return rotate_z(coord, normal, rng.uniform(-max_angle, max_angle))


def random_scale(coord: np.ndarray, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """Isotropic scale by a factor drawn uniformly in [lo, hi] (normals are unchanged)."""
    return coord * np.asarray(rng.uniform(lo, hi), dtype=coord.dtype)


def point_jitter(coord: np.ndarray, rng: np.random.Generator, sigma: float, clip: float) -> np.ndarray:
    """Independent Gaussian displacement per point, clipped to [-clip, clip]."""
    noise = np.clip(rng.standard_normal(coord.shape) * sigma, -clip, clip)
    return coord + noise.astype(coord.dtype)


def augment_geometry(coord: np.ndarray, normal: np.ndarray, rng: np.random.Generator, aug,
                     strong: bool) -> tuple[np.ndarray, np.ndarray]:
    """Teacher (weak): flips + small z-rotation. Student (strong): flips + large z-rotation,
    scale and point jitter. The rotation happens with probability aug.rotate_p (the reference:
    0.5). Input coordinates must already be centred."""
    if aug.flip_xy:
        coord, normal = random_flip_xy(coord, normal, rng)
    if rng.random() < aug.rotate_p:
        coord, normal = random_rotate_z(coord, normal, rng, aug.student_rotate_z if strong else aug.teacher_rotate_z)
    if strong:
        coord = random_scale(coord, rng, aug.student_scale_min, aug.student_scale_max)
        coord = point_jitter(coord, rng, aug.point_jitter_sigma, aug.point_jitter_clip)
    return coord, normal


# --------------------------------------------------------------------------------------------
# Floor / wall / ceiling removal
# --------------------------------------------------------------------------------------------


def _largest_region(region: np.ndarray, in_band: np.ndarray, exclude: set[int]) -> int | None:
    """Region id with the most points inside the band (NO_REGION and `exclude` never chosen)."""
    ids = region[in_band]
    ids = ids[ids != NO_REGION]
    if exclude:
        ids = ids[~np.isin(ids, list(exclude))]
    if ids.size == 0:
        return None
    values, counts = np.unique(ids, return_counts=True)
    return int(values[np.argmax(counts)])  # ties: the smallest id, deterministically


def structures_to_remove(scene: dict, region_key: str, class_names: tuple[str, ...], rng: np.random.Generator,
                         aug) -> tuple[np.ndarray | None, np.ndarray]:
    """Choose the floor / ceiling / wall regions to drop (training only): (keep mask (N,) bool, or
    None when nothing is dropped; the tags with the dropped structures' classes cleared).

    Each structure is one event with its own probability (aug.remove_floor_p, remove_ceiling_p,
    remove_wall_p) and only happens when the scene's tag for that class is set (otherwise the
    biggest region in the band is some other object whose tag we could not honestly clear):
    - floor: among points within aug.removal_band metres of the lowest z, drop the region with
      the most points and clear the 'floor' tag;
    - ceiling: the same within the band below the highest z, clearing 'ceiling';
    - walls: one region per side (the bands along min x, max x, min y, max y) and clear 'wall'.
    A region picked by one event is never picked again. Coordinates must be axis-aligned.
    """
    region = scene[region_key]
    coord = scene["coord"]
    tags = scene["tags"].copy()
    band = aug.removal_band
    lo, hi = coord.min(0), coord.max(0)
    events = (
        ("floor", aug.remove_floor_p, [coord[:, 2] <= lo[2] + band]),
        ("ceiling", aug.remove_ceiling_p, [coord[:, 2] >= hi[2] - band]),
        ("wall", aug.remove_wall_p, [coord[:, 0] <= lo[0] + band, coord[:, 0] >= hi[0] - band,
                                     coord[:, 1] <= lo[1] + band, coord[:, 1] >= hi[1] - band]),
    )
    dropped: set[int] = set()
    for name, p, bands in events:
        if p <= 0:
            continue
        if name not in class_names:
            raise SceneError(f"scene {scene.get('scene_id')}: augment.remove_{name}_p > 0 but the dataset's "
                             f"classes {list(class_names)} have no '{name}'")
        happens = rng.random() < p  # always drawn, so the random stream does not depend on tags
        cls = class_names.index(name)
        if not happens or not tags[cls]:
            continue
        picked = [r for r in (_largest_region(region, b, dropped) for b in bands) if r is not None]
        if picked:
            dropped.update(picked)
            tags[cls] = 0
    if not dropped:
        return None, tags
    return ~np.isin(region, list(dropped)), tags


def remove_structures(scene: dict, region_key: str, class_names: tuple[str, ...], rng: np.random.Generator,
                      aug) -> dict:
    """Drop the regions structures_to_remove picks and clear their tags. Returns a new scene
    dict (points filtered, tags copied); the input is not modified."""
    keep, tags = structures_to_remove(scene, region_key, class_names, rng, aug)
    if keep is None:
        return scene
    out = select_points(scene, keep)
    out["tags"] = tags
    return out


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


def valid_views(scene: dict) -> np.ndarray:
    """Indices of views with a finite pose and intrinsics; logs a warning for each dropped view.
    Needs only view_pose, view_intrinsics (and view_frame for the message)."""
    v = 0 if scene.get("view_pose") is None else scene["view_pose"].shape[0]
    if v == 0:
        return np.zeros(0, np.int64)
    pose_ok = np.isfinite(scene["view_pose"].reshape(v, -1)).all(1)
    k_ok = np.isfinite(scene["view_intrinsics"].reshape(v, -1)).all(1)
    frames = scene.get("view_frame", np.arange(v))
    for i in np.nonzero(~(pose_ok & k_ok))[0]:
        log.warning("scene %s: dropping view %d (frame %d): non-finite %s", scene.get("scene_id"), i,
                    int(frames[i]), "pose" if not pose_ok[i] else "intrinsics")
    return np.nonzero(pose_ok & k_ok)[0].astype(np.int64)


def sample_views(scene: dict, num_views: int, rng: np.random.Generator | None) -> np.ndarray:
    """Pick `num_views` views: split the valid views (in frame order) into that many contiguous
    chunks and take one per chunk, at random with a generator (training) or the first of each
    chunk with rng=None (evaluation). A scene with fewer valid views gives them all.
    Raises SceneError naming the scene when views are needed and none is valid."""
    if num_views == 0:
        return np.zeros(0, np.int64)
    valid = valid_views(scene)
    if valid.size == 0:
        total = 0 if scene.get("view_pose") is None else scene["view_pose"].shape[0]
        raise SceneError(f"scene {scene.get('scene_id')}: no valid view ({total} stored, none with a finite "
                         f"pose), but data.num_views = {num_views}")
    if "view_frame" in scene:
        valid = valid[np.argsort(scene["view_frame"][valid], kind="stable")]
    chunks = [c for c in np.array_split(valid, min(num_views, valid.size))]
    if rng is None:
        return np.array([c[0] for c in chunks], np.int64)
    return np.array([c[rng.integers(c.size)] for c in chunks], np.int64)


def resize_intrinsics(K: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Intrinsics for an image resized from src (H, W) to dst (H, W) (pixel centres at integers)."""
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    out = K.astype(np.float64).copy()
    out[0, 0] *= sx
    out[0, 1] *= sx
    out[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    out[1, 1] *= sy
    out[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    return out


def resize_nearest(image: np.ndarray, dst_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (H, W, ...) arrays (depth, region and label maps)."""
    h, w = image.shape[:2]
    if (h, w) == tuple(dst_hw):
        return image
    ys = np.minimum(((np.arange(dst_hw[0]) + 0.5) * h / dst_hw[0]).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(dst_hw[1]) + 0.5) * w / dst_hw[1]).astype(np.int64), w - 1)
    return image[ys[:, None], xs[None, :]]


def resize_rgb(rgb: np.ndarray, dst_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one uint8 (H, W, 3) image."""
    if rgb.shape[:2] == tuple(dst_hw):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((dst_hw[1], dst_hw[0]), Image.BILINEAR))


def view_color_jitter(rgb: np.ndarray, rng: np.random.Generator,
                      strength: tuple[float, float, float, float]) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter of uint8 (V, H, W, 3) images, with
    independent factors per view (torchvision ColorJitter semantics on PIL images, fixed order;
    the hue shift is done in PIL's 8-bit HSV). Returns uint8."""
    bright, contrast, sat, hue = strength
    out = np.empty_like(rgb)
    for i in range(rgb.shape[0]):
        b = rng.uniform(max(0.0, 1 - bright), 1 + bright)
        c = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
        s = rng.uniform(max(0.0, 1 - sat), 1 + sat)
        h = rng.uniform(-hue, hue)
        img = Image.fromarray(rgb[i])
        img = ImageEnhance.Brightness(img).enhance(b)
        img = ImageEnhance.Contrast(img).enhance(c)
        img = ImageEnhance.Color(img).enhance(s)
        shift = int(round(h * 255)) % 256
        if shift:
            hsv = np.array(img.convert("HSV"))
            hsv[..., 0] += np.uint8(shift)  # wraps around the hue circle
            img = Image.fromarray(hsv, "HSV").convert("RGB")
        out[i] = np.asarray(img)
    return out


# --------------------------------------------------------------------------------------------
# Voxelisation and Mix3D
# --------------------------------------------------------------------------------------------


def voxelize(coord: np.ndarray, feat: np.ndarray, voxel_size: float, feature: str = "mean") -> dict:
    """Quantise points to the voxel grid anchored at the origin.

    Returns voxel_coord int32 (M, 3) = floor(coord / voxel_size), sorted lexicographically (x,
    then y, then z) so the result is deterministic; inverse int64 (N,) point -> voxel row;
    voxel_feat float32 (M, F) = mean of the voxel's point features (feature 'mean') or the
    features of its first point (feature 'first', the reference's one point per voxel);
    voxel_count int64 (M,).
    """
    if feature not in ("mean", "first"):
        raise ValueError(f"voxelize: feature must be 'mean' or 'first', got {feature!r}")
    if coord.shape[0] == 0:
        raise ValueError("voxelize: no points")
    q = np.floor(coord / voxel_size).astype(np.int64)
    lo = q.min(0)
    span = q.max(0) - lo + 1
    if np.prod(span.astype(np.float64)) >= 2.0 ** 62:
        raise ValueError(f"voxelize: extent {span} voxels is too large to index")
    key = ((q[:, 0] - lo[0]) * span[1] + (q[:, 1] - lo[1])) * span[2] + (q[:, 2] - lo[2])
    uniq, first, inverse, count = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    if feature == "first":
        voxel_feat = feat[first].astype(np.float32)
    else:
        voxel_feat = np.empty((uniq.size, feat.shape[1]), np.float32)
        for c in range(feat.shape[1]):
            voxel_feat[:, c] = np.bincount(inverse, weights=feat[:, c], minlength=uniq.size) / count
    return {"voxel_coord": q[first].astype(np.int32), "inverse": inverse.astype(np.int64),
            "voxel_feat": voxel_feat, "voxel_count": count.astype(np.int64)}


def merge_voxels(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """Union of voxelised point clouds on the same grid (Mix3D overlay).

    parts: (voxel_coord (M_i, 3), voxel_feat (M_i, F), voxel_count (M_i,), inverse (N_i,)) with
    coordinates already shifted into the common frame. Voxels present in several parts merge
    into one whose feature is the point-count-weighted mean, exactly what voxelising the
    concatenated points [part 0..., part 1..., ...] would give. Returns the voxelize() keys.
    """
    coords = np.concatenate([p[0] for p in parts]).astype(np.int64)
    feats = np.concatenate([p[1] for p in parts]).astype(np.float64)
    counts = np.concatenate([p[2] for p in parts])
    lo = coords.min(0)
    span = coords.max(0) - lo + 1
    key = ((coords[:, 0] - lo[0]) * span[1] + (coords[:, 1] - lo[1])) * span[2] + (coords[:, 2] - lo[2])
    uniq, first, vox_inv = np.unique(key, return_index=True, return_inverse=True)
    total = np.bincount(vox_inv, weights=counts, minlength=uniq.size)
    merged = np.empty((uniq.size, feats.shape[1]), np.float32)
    for c in range(feats.shape[1]):
        merged[:, c] = np.bincount(vox_inv, weights=feats[:, c] * counts, minlength=uniq.size) / total
    inverse, start = [], 0
    for p in parts:
        inverse.append(vox_inv[start + p[3]])
        start += p[0].shape[0]
    return {"voxel_coord": coords[first].astype(np.int32), "inverse": np.concatenate(inverse).astype(np.int64),
            "voxel_feat": merged, "voxel_count": total.astype(np.int64)}
