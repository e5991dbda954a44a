"""Scene shards -> training / evaluation batches, in a plain Python loop or through Ray Data.

One straight line: plan (the checked dataset: shards in epoch order, columns to read) -> read the
needed shard columns -> decode (shards.row_to_scene) -> make_sample, a chain of small dict-in /
dict-out steps (checked_scene, choose_views, remove_structures: floor/wall/ceiling removal,
subsample, views_and_links: point-pixel links on the un-augmented coordinates, centred_points,
shared_keys, then unaugmented_side or teacher_and_student: teacher-weak / student-strong
augmentation, voxelisation) -> collate (Mix3D overlay of consecutive scene pairs for the student,
concatenation with offsets). `batches(plan(...), cfg, epoch, seed, batch_size, loader)` runs it
in the calling process (loader "local") or the per-scene part in Ray Data (loader "ray", through
`ray_samples`; `RayPassStream` streams several training passes from one dataset); both give the
same batches for the same seed: every scene's random generator derives from (seed, epoch,
scene_id) alone, and the scene order of an epoch from (seed, epoch) alone.

Modes: "train" (augmented teacher + student, no ground truth read), "eval" (one un-augmented
side, plus `label` / `view_label` for metrics), "infer" (one un-augmented side, no ground truth;
pseudo-labelling).

BATCH CONTRACT (numpy arrays ready for torch.from_numpy; B samples, N points, M voxels, V views
per sample, H x W = data.image_height x data.image_width, C classes):

=================== ================= =========================================================
key                 dtype (shape)     meaning
=================== ================= =========================================================
coord               int32 (M, 4)      [batch_index, x, y, z] voxel coords, each sample's min = 0
feat                float32 (M, 6)    colour / 127.5 - 1 and the normal, averaged per voxel
offset              int64 (B,)        cumulative voxel counts per sample (pointcept style)
inverse             int64 (N,)        point -> row of coord (global over the batch)
point_offset        int64 (B,)        cumulative point counts per sample
tags                float32 (B, C)    scene tags (after removal; OR of both scenes under Mix3D)
view_tags           float32 (B, C)    tags for the 2D branch: with augment.removal_2d (default)
                                      the same as `tags`, the removed structures' pixels being
                                      out of `view_valid`; without it, the tags from before the
                                      floor/wall/ceiling removal (the views still show them)
region              int64 (N,)        region ids, unique over the batch, -1 = no region
images              float32 (B*V, 3, H, W)  ImageNet mean/std normalised RGB
view_offset         int64 (B,)        cumulative view counts per sample
link_point          int64 (K,)        batch point of each point-pixel link
link_view           int64 (K,)        batch view (row of images) of each link
link_pixel          int64 (K,)        flat pixel y * W + x of each link, at H x W
view_region         int64 (B*V, H, W) pixel region ids, unique over the batch, -1 = none
view_valid          bool (B*V, H, W)  False on pixels of removed floor/wall/ceiling regions (train
                                      mode, augment.removal_2d); 2D pooling and 2D RPC skip them
scene_id            list[str]         one per sample ("a+b" for a Mix3D sample); never a tensor
label               int64 (N,)        eval mode only: GT class, 255 = ignore
view_label          int64 (B*V, H, W) eval mode only: GT class per pixel, 255 = ignore
teacher_<key>       same              train mode only: the teacher side, for every key above
                                      except label / view_label
=================== ================= =========================================================

Train mode: the keys without prefix are the STUDENT (strong augmentation). Point i of the student
batch is point i of the teacher batch (same points, same order; each side has its own voxels and
`inverse`). Without Mix3D both sides have the same B samples. With Mix3D (augment.mix3d) the
scenes of a batch are paired in order, (0, 1), (2, 3), ...: the student sample of a pair is one
overlaid cloud with points [first..., second...] and views [first..., second...], while the
teacher batch holds the two scenes as separate consecutive samples; an odd last scene stays
unmixed. Point indices, view indices, links, `region`, `view_region` and `view_valid` are therefore identical
on both sides; `offset`, `point_offset`, `view_offset`, `tags`, `view_tags` and `scene_id` follow
each side's samples. Links exist only between a point and a view of its own scene.
"""

from __future__ import annotations

import functools
import logging
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from scipy.spatial import cKDTree

from rayseg.config import Config
from rayseg.data import shards
from rayseg.data import transforms as T
from rayseg.data.linking import link_points, removed_pixel_mask
from rayseg.data.scene import NO_REGION, SceneError, validate_scene

log = logging.getLogger(__name__)

MODES = ("train", "eval", "infer")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
VIEW_COLUMNS = ("view_rgb", "view_depth", "view_pose", "view_intrinsics", "view_frame")
# View columns that are cheap to decode: enough to choose the views before decoding images.
VIEW_META_COLUMNS = ("view_pose", "view_intrinsics", "view_frame")
# Non-scene bookkeeping columns row_to_scene uses (schema check, sizes of zero-view scenes).
ROW_COLUMNS = ("schema_version", "image_height", "image_width")
# A pixel takes the removed / kept status of its nearest point within this many metres (synthetic
# scans sample ~10 cm apart; pixels farther from every point stay in the pooling).
REMOVAL_PIXEL_DISTANCE = 0.2
# Per-side keys of a sample; the teacher's carry the prefix "teacher_".
SIDE_KEYS = ("coord", "feat", "count", "inverse", "images")


class PipelineError(ValueError):
    """The dataset cannot feed this pipeline (missing column, bad mode, ...); names what is wrong."""


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise PipelineError(f"mode must be one of {list(MODES)}, got {mode!r}")


def region_keys(cfg: Config) -> tuple[str | None, str | None]:
    """Scene keys of the configured partition: (region_<name>, view_region_<name>), or Nones
    when data.region_column is '' (no regions: every id is -1 and removal is skipped)."""
    name = cfg.data.region_column
    return (f"region_{name}", f"view_region_{name}") if name else (None, None)


def scene_rng(seed: int, epoch: int, scene_id: str) -> np.random.Generator:
    """The generator of one scene in one epoch: a function of (seed, epoch, scene_id) only."""
    if seed < 0 or epoch < 0:
        raise PipelineError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch, zlib.crc32(scene_id.encode())])


# --------------------------------------------------------------------------------------------
# One scene -> one sample: small steps, each a plain dict in -> a new dict out
# --------------------------------------------------------------------------------------------
# make_sample runs them in order. The scene dict goes through the first steps (none changes its
# input; each adds or replaces keys); the last ones build the sample's keys. Keys the steps add
# to the scene: views (chosen view indices), view_tags, removed + unremoved_coord (only when
# structures were removed), then images, view_region, view_valid, link_* (and, in eval mode,
# view_label replaced by the chosen views' labels at the network's resolution).
#
# Only choose_views, remove_structures, subsample and teacher_and_student draw from rng, in
# that order. The order is part of the result: resume and the Ray == plain loop equality rely on
# every scene drawing the same numbers, so a new draw goes after the existing ones.


def _scene_name(scene: dict) -> str:
    return str(scene.get("scene_id", "<no scene_id>"))


def checked_scene(scene: dict, cfg: Config, mode: str) -> dict:
    """The scene as this mode may see it: ground-truth keys dropped unless mode is "eval" (so
    training cannot use them by mistake), checked, with the configured region columns present."""
    sid = _scene_name(scene)
    if "coord" not in scene or len(scene["coord"]) == 0:
        raise SceneError(f"scene {sid}: coord: scene has zero points")
    scene = {k: v for k, v in scene.items() if mode == "eval" or k not in ("label", "instance", "view_label")}
    validate_scene(scene)
    region_key, view_region_key = region_keys(cfg)
    for key in ([region_key] if region_key else []) + ([view_region_key] if region_key and cfg.data.num_views else []):
        if key not in scene:
            raise SceneError(f"scene {sid}: {key}: region column missing (data.region_column = "
                             f"{cfg.data.region_column!r}; scene has {sorted(scene)})")
    return scene


def choose_views(scene: dict, cfg: Config, rng: np.random.Generator, mode: str,
                 views: np.ndarray | None = None) -> dict:
    """+ views: the data.num_views view indices (random per chunk in training, the first of each
    chunk otherwise), or the given ones when the loader already chose them with this rng."""
    if views is None:
        views = T.sample_views(scene, cfg.data.num_views, rng if mode == "train" else None)
    return {**scene, "views": views}


def remove_structures(scene: dict, cfg: Config, rng: np.random.Generator, mode: str,
                      class_names: tuple[str, ...]) -> dict:
    """Training with augmentation and regions: drop floor / wall / ceiling regions at random (once,
    before the teacher/student split, so both sides keep the same points) and clear their tags.
    + view_tags: the tags the views stand for; the stored tags, since the images still show the
    removed structures, unless augment.removal_2d takes their pixels out of the pooling too.
    + removed (mask over the points before removal) and unremoved_coord, when something went:
    views_and_links needs them to find the removed structures' pixels."""
    aug = cfg.augment
    region_key, _ = region_keys(cfg)
    scene = {**scene, "view_tags": scene["tags"].astype(np.float32)}
    if not (mode == "train" and aug.enabled and region_key):
        return scene
    keep, tags = T.structures_to_remove(scene, region_key, tuple(class_names), rng, aug)
    if keep is None:
        return scene
    out = {**T.select_points(scene, keep), "tags": tags, "removed": ~keep, "unremoved_coord": scene["coord"]}
    if aug.removal_2d:
        out["view_tags"] = tags.astype(np.float32)
    return out


def subsample(scene: dict, cfg: Config, rng: np.random.Generator, mode: str) -> dict:
    """Training: at most data.max_points points, a random subset kept in stored order."""
    n, cap = scene["coord"].shape[0], cfg.data.max_points
    if mode != "train" or not cap or n <= cap:
        return scene
    return T.select_points(scene, np.sort(rng.choice(n, cap, replace=False)))


def views_and_links(scene: dict, cfg: Config, mode: str) -> dict:
    """The chosen views at the network's resolution and their point-pixel links, made from the
    stored (un-augmented) world coordinates so augmentation never moves a link.
    + images uint8 (V, H, W, 3), view_region int32 (V, H, W), view_valid bool (V, H, W) (False on
    the removed structures' pixels with augment.removal_2d, as their points left 3D),
    link_point / link_view / link_pixel; eval mode: view_label becomes the chosen views' labels."""
    hw = (cfg.data.image_height, cfg.data.image_width)
    _, view_region_key = region_keys(cfg)
    views, world = scene["views"], scene["coord"]
    rgb = np.zeros((len(views),) + hw + (3,), np.uint8)
    view_region = np.full((len(views),) + hw, NO_REGION, np.int32)
    view_label = np.zeros((len(views),) + hw, np.uint8)
    view_valid = np.ones((len(views),) + hw, bool)
    removed_tree = None
    if "removed" in scene and cfg.augment.removal_2d and len(views):
        removed_tree = cKDTree(scene["unremoved_coord"])
    link_point, link_view, link_pixel = [], [], []
    for j, i in enumerate(views):
        src_hw = scene["view_rgb"].shape[1:3]
        rgb[j] = T.resize_rgb(scene["view_rgb"][i], hw)
        depth = T.resize_nearest(scene["view_depth"][i], hw)
        K = T.resize_intrinsics(scene["view_intrinsics"][i], src_hw, hw)
        p, px = link_points(world, depth, scene["view_pose"][i], K, cfg.data.voxel_size)
        link_point.append(p)
        link_view.append(np.full(p.shape, j, np.int64))
        link_pixel.append(px)
        if removed_tree is not None:
            view_valid[j] = ~removed_pixel_mask(removed_tree, scene["removed"], depth, scene["view_pose"][i], K,
                                                REMOVAL_PIXEL_DISTANCE)
        if view_region_key:
            view_region[j] = T.resize_nearest(scene[view_region_key][i], hw)
        if mode == "eval" and "view_label" in scene:
            view_label[j] = T.resize_nearest(scene["view_label"][i], hw)
    out = {
        **scene, "images": rgb, "view_region": view_region, "view_valid": view_valid,
        "link_point": np.concatenate(link_point) if link_point else np.zeros(0, np.int64),
        "link_view": np.concatenate(link_view) if link_view else np.zeros(0, np.int64),
        "link_pixel": np.concatenate(link_pixel) if link_pixel else np.zeros(0, np.int64),
    }
    if mode == "eval" and "view_label" in scene:
        out["view_label"] = view_label
    return out


def centred_points(scene: dict) -> dict:
    """The points as the networks take them: float32 coordinates centred by T.center (after the
    links, which need the stored world coordinates), float32 colour, normal (zeros if none)."""
    n = scene["coord"].shape[0]
    normal = scene["normal"].astype(np.float32) if "normal" in scene else np.zeros((n, 3), np.float32)
    return {**scene, "coord": T.center(scene["coord"].astype(np.float32)),
            "color": scene["color"].astype(np.float32), "normal": normal}


def shared_keys(scene: dict, cfg: Config, mode: str) -> dict:
    """The sample keys both sides share (point i is point i on both): tags, regions, views'
    regions / validity, links, pseudo-labels."""
    region_key, _ = region_keys(cfg)
    n = scene["coord"].shape[0]
    sample: dict[str, Any] = {
        "scene_id": _scene_name(scene),
        "mix3d": bool(mode == "train" and cfg.augment.mix3d),
        "tags": scene["tags"].astype(np.float32),
        "view_tags": scene["view_tags"],
        "region": scene[region_key].astype(np.int32) if region_key else np.full(n, NO_REGION, np.int32),
        **{k: scene[k] for k in ("view_region", "view_valid", "link_point", "link_view", "link_pixel")},
    }
    if "pseudo_label" in scene:
        sample["pseudo_label"] = scene["pseudo_label"]
    return sample


def _side(coord: np.ndarray, color: np.ndarray, normal: np.ndarray, rgb: np.ndarray, voxel_size: float,
          prefix: str = "", voxel_feature: str = "mean") -> dict:
    """One side's keys (SIDE_KEYS, with prefix): the voxelised points and the side's images."""
    feat = np.concatenate([color / 127.5 - 1.0, normal], axis=1)
    vox = T.voxelize(coord, feat, voxel_size, voxel_feature)
    return {prefix + "coord": vox["voxel_coord"], prefix + "feat": vox["voxel_feat"],
            prefix + "count": vox["voxel_count"], prefix + "inverse": vox["inverse"], prefix + "images": rgb}


def unaugmented_side(scene: dict, cfg: Config, mode: str) -> dict:
    """Eval / infer: the one un-augmented side; eval adds label and view_label (255 = ignore
    where the dataset has no view labels)."""
    out = _side(scene["coord"], scene["color"], scene["normal"], scene["images"], cfg.data.voxel_size,
                voxel_feature=cfg.data.voxel_feature)
    if mode == "eval":
        if "label" not in scene:
            raise SceneError(f"scene {_scene_name(scene)}: label: missing (eval mode needs ground truth)")
        out["label"] = scene["label"]
        out["view_label"] = scene["view_label"] if "view_label" in scene else \
            np.full(scene["images"].shape[:3], 255, np.uint8)
    return out


def teacher_and_student(scene: dict, cfg: Config, rng: np.random.Generator) -> dict:
    """Training: the teacher side (teacher_ keys, weak augmentation) and the student side (no
    prefix, strong augmentation) of the same points in the same order, each voxelised on its
    own; + mix_offset, where this scene goes when it is the second of a Mix3D pair."""
    aug = cfg.augment
    coord, color, normal, rgb = scene["coord"], scene["color"], scene["normal"], scene["images"]
    t_color, t_coord, t_normal, t_rgb = color, coord, normal, rgb
    s_color, s_coord, s_normal, s_rgb = color, coord, normal, rgb
    if aug.enabled:
        if aug.chromatic_teacher:
            t_color = T.chromatic_augment(color, rng, aug)
        t_coord, t_normal = T.augment_geometry(coord, normal, rng, aug, strong=False)
        t_rgb = T.view_color_jitter(rgb, rng, aug.view_jitter_teacher)
        s_color = T.chromatic_augment(t_color, rng, aug)  # on top of the teacher's, as the reference
        s_coord, s_normal = T.augment_geometry(coord, normal, rng, aug, strong=True)
        s_rgb = T.view_color_jitter(rgb, rng, aug.view_jitter_student)
    out = {**_side(t_coord, t_color, t_normal, t_rgb, cfg.data.voxel_size, "teacher_", cfg.data.voxel_feature),
           **_side(s_coord, s_color, s_normal, s_rgb, cfg.data.voxel_size, "", cfg.data.voxel_feature)}
    # Drawn for every training sample, Mix3D or not: collate decides whether to use it.
    shift = rng.uniform(-aug.mix3d_max_offset, aug.mix3d_max_offset, 2) / cfg.data.voxel_size
    out["mix_offset"] = np.array([round(shift[0]), round(shift[1]), 0], np.int32)  # whole voxels in x and y
    return out


def make_sample(scene: dict, cfg: Config, rng: np.random.Generator, mode: str,
                class_names: tuple[str, ...] = (), views: np.ndarray | None = None) -> dict:
    """Turn one decoded scene record into one sample (per-scene arrays; `collate` batches them).

    rng drives every random choice (use scene_rng(seed, epoch, scene_id)); in "eval"/"infer"
    nothing is random. class_names (the dataset's, from its manifest) name the floor / wall /
    ceiling tags that region removal clears. Ground-truth keys are read only in "eval" mode.
    views: indices of views already chosen with transforms.sample_views and this same rng (the
    loaders do that to decode only those images); None = choose them here, which gives the same
    result.
    Raises SceneError naming the scene for a zero-point scene, a missing region column, or no
    valid view when data.num_views > 0.
    """
    _check_mode(mode)
    scene = checked_scene(scene, cfg, mode)
    # View choice, removal and subsampling happen once, before the teacher/student split.
    scene = choose_views(scene, cfg, rng, mode, views)
    scene = remove_structures(scene, cfg, rng, mode, class_names)
    scene = subsample(scene, cfg, rng, mode)
    scene = views_and_links(scene, cfg, mode)
    scene = centred_points(scene)
    sample = shared_keys(scene, cfg, mode)
    if mode != "train":
        return {**sample, **unaugmented_side(scene, cfg, mode)}
    return {**sample, **teacher_and_student(scene, cfg, rng)}


# --------------------------------------------------------------------------------------------
# Samples -> batch
# --------------------------------------------------------------------------------------------


def _id_offsets(arrays: list[np.ndarray]) -> list[int]:
    """Offsets that make the non-negative ids of consecutive parts distinct: each part starts
    after the largest id seen so far (parts without ids take no room)."""
    offsets, start = [], 0
    for a in arrays:
        offsets.append(start)
        if a.size:
            start += max(int(a.max()) + 1, 0)
    return offsets


def _shift_ids(a: np.ndarray, offset: int) -> np.ndarray:
    """int64 copy of an id array with offset added to the ids >= 0 (-1 stays -1)."""
    out = a.astype(np.int64)
    if offset:
        out[out >= 0] += offset
    return out


def mix3d(first: dict, second: dict) -> dict:
    """Mix3D overlay of two student samples (make_sample output, keys without prefix): points
    [first..., second...] with the second scene shifted by its `mix_offset` voxels, voxels merged
    on the common grid, views [first..., second...], tags OR-ed. Returns the per-side keys only:
    regions and links are per scene, and `collate` offsets them over the batch exactly as for the
    teacher (the second scene's region ids come after the first's; each scene's links point
    only to its own views)."""
    vox = T.merge_voxels([
        (first["coord"], first["feat"], first["count"], first["inverse"]),
        (second["coord"] + second["mix_offset"], second["feat"], second["count"], second["inverse"]),
    ])
    return {
        "scene_id": f"{first['scene_id']}+{second['scene_id']}",
        "coord": vox["voxel_coord"], "feat": vox["voxel_feat"], "count": vox["voxel_count"],
        "inverse": vox["inverse"],
        "images": np.concatenate([first["images"], second["images"]]),
        "tags": np.maximum(first["tags"], second["tags"]),
        "view_tags": np.maximum(first["view_tags"], second["view_tags"]),
    }


def normalize_images(rgb: np.ndarray) -> np.ndarray:
    """uint8 (V, H, W, 3) -> float32 (V, 3, H, W), ImageNet mean/std normalised."""
    scale = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)[None, :, None, None]
    bias = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)[None, :, None, None]
    out = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2)).astype(np.float32)
    out *= scale
    out += bias
    return out


def _stack_side(parts: list[dict]) -> dict:
    """One side of a batch from its samples: voxels, points, views and tags with offsets."""
    num_voxels = np.array([p["coord"].shape[0] for p in parts], np.int64)
    voxel_start = np.concatenate([[0], np.cumsum(num_voxels)[:-1]])
    coord = np.concatenate([
        np.concatenate([np.full((p["coord"].shape[0], 1), b, np.int32), p["coord"] - p["coord"].min(0)], 1)
        for b, p in enumerate(parts)]).astype(np.int32)
    return {
        "coord": coord,
        "feat": np.concatenate([p["feat"] for p in parts]).astype(np.float32),
        "offset": np.cumsum(num_voxels),
        "inverse": np.concatenate([p["inverse"] + s for p, s in zip(parts, voxel_start)]).astype(np.int64),
        "point_offset": np.cumsum([p["inverse"].shape[0] for p in parts]).astype(np.int64),
        "tags": np.stack([p["tags"] for p in parts]).astype(np.float32),
        "view_tags": np.stack([p["view_tags"] for p in parts]).astype(np.float32),
        "images": normalize_images(np.concatenate([p["images"] for p in parts])),
        "view_offset": np.cumsum([p["images"].shape[0] for p in parts]).astype(np.int64),
        "scene_id": [str(p["scene_id"]) for p in parts],
    }


def _stack_scenes(samples: list[dict]) -> dict:
    """Per-point and per-view arrays of the batch's scenes, in order: the same for both sides."""
    point_start = np.concatenate([[0], np.cumsum([s["region"].shape[0] for s in samples])[:-1]])
    view_start = np.concatenate([[0], np.cumsum([s["view_region"].shape[0] for s in samples])[:-1]])
    region_off = _id_offsets([s["region"] for s in samples])
    view_region_off = _id_offsets([s["view_region"] for s in samples])
    out = {
        "region": np.concatenate([_shift_ids(s["region"], o) for s, o in zip(samples, region_off)]),
        "view_region": np.concatenate([_shift_ids(s["view_region"], o) for s, o in zip(samples, view_region_off)]),
        "view_valid": np.concatenate([s["view_valid"] for s in samples]),
        "link_point": np.concatenate([s["link_point"] + o for s, o in zip(samples, point_start)]).astype(np.int64),
        "link_view": np.concatenate([s["link_view"] + o for s, o in zip(samples, view_start)]).astype(np.int64),
        "link_pixel": np.concatenate([s["link_pixel"] for s in samples]).astype(np.int64),
    }
    if "pseudo_label" in samples[0]:
        out["pseudo_label"] = np.concatenate([s["pseudo_label"] for s in samples]).astype(np.int64)
    if "label" in samples[0]:
        out["label"] = np.concatenate([s["label"] for s in samples]).astype(np.int64)
        out["view_label"] = np.concatenate([s["view_label"] for s in samples]).astype(np.int64)
    return out


def collate(samples: list[dict]) -> dict:
    """Batch per-scene samples (make_sample outputs, in order) following the BATCH CONTRACT."""
    if not samples:
        raise PipelineError("collate: no samples")
    scenes = _stack_scenes(samples)
    if "teacher_coord" not in samples[0]:
        return {**_stack_side(samples), **scenes}
    teacher = [{**s, **{k: s["teacher_" + k] for k in SIDE_KEYS}} for s in samples]
    student = list(samples)
    if bool(samples[0]["mix3d"]):
        student = [mix3d(*student[i:i + 2]) if i + 1 < len(student) else student[i]
                   for i in range(0, len(student), 2)]
    batch = {**_stack_side(student), **scenes}
    # The teacher's per-point / per-view arrays are the very same (point i is point i).
    batch.update({"teacher_" + k: v for k, v in {**_stack_side(teacher), **scenes}.items()})
    return batch


# --------------------------------------------------------------------------------------------
# The dataset: columns, order, checks (before anything heavy starts)
# --------------------------------------------------------------------------------------------


@dataclass
class DatasetPlan:
    """What one pass reads: the shards in epoch order, the columns, the class names."""

    root: Path
    split: str
    mode: str
    paths: list[Path]
    scene_ids: list[str]
    columns: list[str]
    read_columns: list[str]
    class_names: tuple[str, ...]

    def only(self, paths: Iterable[Path]) -> DatasetPlan:
        """This plan restricted to some of its shards, in the given order (a rank's share, the
        scenes still to label, or none: a pass's columns without its path list)."""
        ids = dict(zip(self.paths, self.scene_ids))
        paths = list(paths)
        unknown = [str(x) for x in paths if x not in ids]
        if unknown:
            raise PipelineError(f"{self.root}: {unknown[:3]} are not shards of this plan's split {self.split!r}")
        return replace(self, paths=paths, scene_ids=[ids[x] for x in paths])


def plan(root: str | Path, split: str, cfg: Config, mode: str, epoch: int = 0, seed: int | None = None) -> DatasetPlan:
    """Check the dataset can feed this mode and list what to read, in epoch order.

    Train: a seeded shuffle of the split per (seed, epoch); eval/infer: scene-id order. Only the
    needed columns are read; ground-truth columns only in eval mode. Missing dataset, empty split
    or missing region column -> an error naming the column, the dataset root and what exists."""
    _check_mode(mode)
    root = Path(root)
    seed = cfg.seed if seed is None else seed
    manifest = shards.load_manifest(root)
    entries = sorted((e for e in manifest["scenes"] if e["split"] == split), key=lambda e: e["scene_id"])
    if not entries:
        raise PipelineError(f"{root}: no scenes in split {split!r} (manifest has {manifest.get('splits')})")
    shards.check_listed_files(root, entries, manifest)  # a missing / truncated shard named before Ray reads it
    paths = [root / e["path"] for e in entries]
    available = shards.shard_columns(paths[0])
    region_key, view_region_key = region_keys(cfg)
    if region_key:
        lacking = [e["scene_id"] for e in entries if cfg.data.region_column not in e.get("regions", [])]
        if region_key not in available or lacking:
            raise PipelineError(
                f"{root}: region column {region_key!r} (data.region_column = {cfg.data.region_column!r}) is "
                f"missing from {len(lacking) or 'the'} scene(s) of split {split!r}"
                f"{' e.g. ' + ', '.join(lacking[:3]) if lacking else ''}; the dataset has columns {available} "
                f"(run `rayseg partition` or set data.region_column)")
    wanted = ["scene_id", "split", "coord", "color", "normal", "tags"]
    if cfg.data.num_views:
        wanted += list(VIEW_COLUMNS) + ([view_region_key] if view_region_key else [])
    if region_key:
        wanted.append(region_key)
    if mode == "eval":
        wanted += ["label"] + (["view_label"] if cfg.data.num_views else [])
    optional = {"normal", "view_label"}
    missing = [c for c in wanted if c not in available and c not in optional]
    if missing:
        raise PipelineError(f"{root}: column(s) {missing} needed for mode {mode!r} are missing "
                            f"(shard {paths[0].name} has {available})")
    columns = [c for c in wanted if c in available]
    columns = columns if mode == "eval" else shards.without_gt(columns)
    order = np.arange(len(entries))
    if mode == "train":
        order = np.random.default_rng([seed, epoch]).permutation(len(entries))
    return DatasetPlan(root=root, split=split, mode=mode, paths=[paths[i] for i in order],
                       scene_ids=[entries[i]["scene_id"] for i in order], columns=columns,
                       read_columns=columns + [c for c in ROW_COLUMNS if c in available],
                       class_names=tuple(manifest.get("class_names", ())))


# --------------------------------------------------------------------------------------------
# One shard -> one sample: the unit both loaders run
# --------------------------------------------------------------------------------------------


def sample_from_row(row: dict, columns: list[str], cfg: Config, mode: str, epoch: int, seed: int,
                    class_names: tuple[str, ...]) -> dict:
    """One shard row (pyarrow or Ray Data) -> one sample: decode -> make_sample. The views are
    chosen first from the poses alone, so only the chosen images are decoded (a ScanNet scene
    stores ~100 frames and uses 6)."""
    unexpected = [k for k in row if k in shards.GT_COLUMNS and k not in columns]
    if unexpected:  # a guard on the column projection: training must never receive ground truth
        raise PipelineError(f"scene {row.get('scene_id')}: ground-truth column(s) {unexpected} were read")
    sid = str(row["scene_id"])
    rng = scene_rng(seed, epoch, sid)
    if not (cfg.data.num_views and "view_pose" in columns):
        return make_sample(_with_pseudo_labels(shards.row_to_scene(row, columns), cfg, mode), cfg, rng, mode,
                           class_names)
    meta = shards.row_to_scene(row, [c for c in columns if c in VIEW_META_COLUMNS])
    chosen = T.sample_views(meta, cfg.data.num_views, rng if mode == "train" else None)
    num_stored = meta["view_pose"].shape[0]
    sliced, whole = dict(row), list(VIEW_META_COLUMNS)
    for k, v in row.items():
        if not shards.per_view(k):
            continue
        if isinstance(v, (bytes, bytearray)):  # one whole (V, H, W) array: slice after decoding
            whole.append(k)
            continue
        if len(v) != num_stored:
            raise shards.ShardError(f"scene {sid}: {k}: {len(v)} values for {num_stored} view poses")
        sliced[k] = [v[i] for i in chosen]
    scene = shards.row_to_scene(sliced, columns)
    for k in whole:
        if k in scene:
            scene[k] = scene[k][chosen]
    return make_sample(_with_pseudo_labels(scene, cfg, mode), cfg, rng, mode, class_names,
                       views=np.arange(len(chosen)))


def _with_pseudo_labels(scene: dict, cfg: Config, mode: str) -> dict:
    """Stage seg: attach the scene's pseudo-labels (data.pseudo_labels) as a per-point key."""
    if mode != "train" or not cfg.data.pseudo_labels:
        return scene
    from rayseg.data.pseudo_store import pseudo_path, read_pseudo

    sid = str(scene["scene_id"])
    path = pseudo_path(cfg.data.pseudo_labels, str(scene["split"]), sid)
    return {**scene, "pseudo_label": read_pseudo(path, sid, scene["coord"].shape[0])}


def _read_row(path: Path, columns: list[str]) -> dict:
    """The single row of a shard, as plain Python values (bytes, lists); errors name the file."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"shard {path} does not exist")
    try:
        table = pq.ParquetFile(path, page_checksum_verification=True).read(columns=columns)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise shards.ShardError(f"shard {path}: unreadable parquet ({type(exc).__name__}: {exc})") from None
    if table.num_rows != 1:
        raise shards.ShardError(f"shard {path}: expected exactly 1 row, found {table.num_rows}")
    return table.to_pylist()[0]


def read_sample(path: Path, p: DatasetPlan, cfg: Config, epoch: int, seed: int) -> dict:
    """One shard of the plan -> its sample, in this process (read the plan's columns -> decode ->
    make_sample); errors name the shard. epoch and seed must be the ones the plan was made with."""
    try:
        return sample_from_row(_read_row(path, p.read_columns), p.columns, cfg, p.mode, epoch, seed, p.class_names)
    except shards.ShardError as exc:
        raise shards.ShardError(f"shard {path}: {exc}") from None


# --------------------------------------------------------------------------------------------
# A plan's batches, in this process or through Ray Data
# --------------------------------------------------------------------------------------------

LOADERS = ("local", "ray")


def batches(p: DatasetPlan, cfg: Config, epoch: int, seed: int, batch_size: int,
            loader: str = "local") -> Iterator[dict]:
    """Collated batches (the BATCH CONTRACT) of the plan's shards, in the plan's order (e.g. one
    rank's slice of plan(...).paths), grouping consecutive samples. loader "local" makes the
    samples in this process; "ray" in Ray Data tasks, one per shard (Ray must be initialised;
    a plan without shards is refused). Both give the same batches. epoch and seed must be the
    ones the plan was made with."""
    if loader not in LOADERS:
        raise PipelineError(f"loader must be one of {list(LOADERS)}, got {loader!r}")
    if loader == "ray":
        samples = (from_ray_row(row) for row in ray_samples([(epoch, p)], cfg, seed).iter_rows())
    else:
        samples = (read_sample(path, p, cfg, epoch, seed) for path in p.paths)
    return _collated(samples, batch_size)


def _collated(samples: Iterable[dict], batch_size: int) -> Iterator[dict]:
    if batch_size <= 0:
        raise PipelineError(f"batch_size must be > 0, got {batch_size}")
    buf: list[dict] = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
    if buf:
        yield collate(buf)


def configure_ray_data(cfg: Config) -> None:
    """ENVIRONMENT.md settings: scene-sized blocks, ordered output (so batches are the same as the
    plain loop's), and a quiet terminal: no per-dataset progress bars or "Starting execution"
    banners (training prints its own progress line), Ray Data's logger at warnings only. Ray
    Data's read tasks each need a whole free CPU (measured on Ray 2.60: with only 0.5 CPU free
    it waits forever), so training workers must leave at least one CPU of the cluster unclaimed."""
    import ray.data

    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = cfg.ray.data_block_mb * 1024 * 1024
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


def ray_samples(passes: list[tuple[int, DatasetPlan]], cfg: Config, seed: int):
    """A lazy ray.data.Dataset of the samples of one or more passes: the samples of each (epoch,
    plan) in turn, in the plan's order, each made with its own epoch's random draws (batches(...,
    loader="ray") and RayPassStream collate them; rayseg pseudo maps its labelling actors over
    them). Built from the plans' shard paths (from_items), so there is no Parquet listing or
    footer scan per pass: every task reads its one shard with read_sample, as the local loop."""
    import ray.data

    for _, p in passes:
        if not p.paths:
            raise PipelineError(f"{p.root}: the plan for split {p.split!r} has no shards")
    if not passes:
        raise PipelineError("no passes to read")
    configure_ray_data(cfg)
    items = [{"path": str(path), "pass": i} for i, (_, p) in enumerate(passes) for path in p.paths]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # A task needs a plan's columns, not its path list: each reads the one path of its item.
    specs = [(epoch, p.only([])) for epoch, p in passes]
    return ds.map(functools.partial(_sample_from_item, passes=specs, cfg=cfg, seed=seed),
                  num_cpus=cfg.ray.data_task_cpus)


def _sample_from_item(item: dict, passes: list[tuple[int, DatasetPlan]], cfg: Config, seed: int) -> dict:
    epoch, p = passes[item["pass"]]
    return read_sample(Path(item["path"]), p, cfg, epoch, seed)


class RayPassStream:
    """Batches of consecutive training passes streamed from one Ray Data dataset per window of
    passes, so the data of the next pass is being made while this one trains (no dataset rebuilt
    and no pipeline restarted per epoch). A window holds whole passes, at most `window_scenes`
    scenes (at least one pass), so a long schedule on a large dataset is not planned as one
    dataset of millions of rows. `batches(epoch)` must be called for the planned epochs in order;
    each yields exactly that pass's batches (batches never span two passes)."""

    def __init__(self, plans: list[tuple[int, DatasetPlan]], cfg: Config, seed: int, batch_size: int,
                 window_scenes: int = 4096):
        if not plans:
            raise PipelineError("pass stream: no passes planned")
        self._cfg, self._seed, self._batch_size = cfg, seed, batch_size
        self._windows: list[list[tuple[int, DatasetPlan]]] = [[]]
        for epoch, p in plans:
            window = self._windows[-1]
            if window and sum(len(q.paths) for _, q in window) + len(p.paths) > window_scenes:
                self._windows.append(window := [])
            window.append((epoch, p))
        self._counts = [(epoch, len(p.paths), w) for w, window in enumerate(self._windows) for epoch, p in window]
        self._dataset = ray_samples(self._windows[0], cfg, seed)  # checks before any pass runs
        self._window = 0
        self._rows: Iterator | None = None
        self._next = 0

    def batches(self, epoch: int) -> Iterator[dict]:
        if self._next >= len(self._counts) or self._counts[self._next][0] != epoch:
            planned = [e for e, _, _ in self._counts[self._next:]]
            raise PipelineError(f"pass stream: epoch {epoch} requested, the next planned passes are {planned}")
        _, count, window = self._counts[self._next]
        self._next += 1
        if window != self._window:
            self._window, self._rows = window, None
            self._dataset = ray_samples(self._windows[window], self._cfg, self._seed)
        if self._rows is None:
            self._rows = iter(self._dataset.iter_rows())
        yield from _collated((from_ray_row(next(self._rows)) for _ in range(count)), self._batch_size)


def from_ray_row(row: Any) -> dict:
    """A Ray Data row back to a plain sample dict (numpy arrays, str, bool)."""
    out = {}
    for k, v in dict(row).items():
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# `rayseg stream`: look at what the pipeline makes of a dataset
# --------------------------------------------------------------------------------------------


def stream(cfg: Config, split: str, mode: str, epoch: int = 0, use_ray: bool = False, max_batches: int = 0) -> dict:
    """Run one pass of a split through the pipeline, print one line per batch and the rate.
    Returns {"batches", "scenes", "points", "links", "seconds"}. Ray must be initialised for use_ray."""
    import time

    batch_size = cfg.optim.batch_size
    start = time.perf_counter()
    p = plan(cfg.data.root, split, cfg, mode, epoch, cfg.seed)
    one_pass = batches(p, cfg, epoch, cfg.seed, batch_size, loader="ray" if use_ray else "local")
    totals = {"batches": 0, "scenes": 0, "points": 0, "links": 0}
    side = "teacher_" if mode == "train" else ""
    for batch in one_pass:
        totals["batches"] += 1
        totals["scenes"] += len(batch[side + "scene_id"])
        totals["points"] += int(batch["inverse"].shape[0])
        totals["links"] += int(batch["link_point"].shape[0])
        print(f"batch {totals['batches']}: scenes {batch[side + 'scene_id']}, points {batch['inverse'].shape[0]}, "
              f"voxels {batch['coord'].shape[0]}, views {batch['images'].shape[0]}, "
              f"links {batch['link_point'].shape[0]}, regions {len(np.unique(batch['region'][batch['region'] >= 0]))}",
              flush=True)
        if max_batches and totals["batches"] >= max_batches:
            break
    totals["seconds"] = time.perf_counter() - start
    print(f"{totals['scenes']} scenes in {totals['seconds']:.1f} s ({totals['scenes'] / totals['seconds']:.2f} "
          f"scenes/s, {'Ray Data' if use_ray else 'plain loop'}, mode {mode}, split {split})", flush=True)
    return totals
