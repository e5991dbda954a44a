"""The scene record: the one data contract shared by every numpy stage of rayseg.

A scene is a plain ``dict`` of numpy arrays (plus a few scalars). Generators and dataset readers
produce it, shards store it, the pipeline consumes it. Conventions:

- world frame: metres, z up; the same frame as the view poses;
- cameras: OpenCV pinhole (x right, y down, z forward); ``view_pose`` is camera-to-world;
- ``label`` / ``instance`` / ``view_label`` are ground truth, for EVALUATION ONLY: training code
  paths never read them (the pipeline drops them unless asked for evaluation);
- regions: ``region_<method>`` int32 per point, ``view_region_<method>`` int32 per pixel;
  ``NO_REGION`` (-1) = the point/pixel belongs to no region.

Keys (N points, V views of H x W, C classes):

================== ============ =========================================================
key                dtype/shape  meaning
================== ============ =========================================================
scene_id           str          unique id
split              str          'train' / 'val' / 'test'
coord              f32 (N,3)    point coordinates
color              u8  (N,3)    RGB
normal             f32 (N,3)    unit normals (zeros where unknown)
label              u8  (N,)     GT class 0..C-1, IGNORE_LABEL = ignored / unknown   [eval]
instance           i32 (N,)     GT instance id, -1 = none                            [eval]
tags               u8  (C,)     scene-level multi-hot tag vector (the only supervision)
view_rgb           u8  (V,H,W,3)
view_depth         f32 (V,H,W)  metres, 0 = invalid
view_pose          f32 (V,4,4)  camera-to-world
view_intrinsics    f32 (V,3,3)  pinhole K at H x W
view_frame         i32 (V,)     frame index in the original sequence
view_label         u8  (V,H,W)  GT class per pixel, IGNORE_LABEL = none              [eval]
region_<m>         i32 (N,)     region ids of partition method m
view_region_<m>    i32 (V,H,W)  pixel region ids of method m
================== ============ =========================================================
"""

from __future__ import annotations

import numpy as np

IGNORE_LABEL = 255
NO_REGION = -1

SCANNET20 = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
    "bathtub", "otherfurniture",
)
S3DIS13 = (
    "ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair", "sofa",
    "bookcase", "board", "clutter",
)
PROFILES = {"scannet20": SCANNET20, "s3dis13": S3DIS13}

# Ground-truth keys: evaluation only.
GT_KEYS = ("label", "instance", "view_label")


class SceneError(ValueError):
    """A scene record is malformed; the message names the scene and the key."""


def num_views(scene: dict) -> int:
    rgb = scene.get("view_rgb")
    return 0 if rgb is None else int(rgb.shape[0])


def region_methods(scene: dict) -> list[str]:
    return sorted(k[len("region_"):] for k in scene if k.startswith("region_"))


def validate_scene(scene: dict, num_classes: int | None = None) -> None:
    """Raise SceneError naming the scene and key if the record breaks the contract."""
    sid = scene.get("scene_id", "<no scene_id>")

    def fail(key: str, msg: str) -> None:
        raise SceneError(f"scene {sid}: {key}: {msg}")

    for key in ("scene_id", "split", "coord", "color", "tags"):
        if key not in scene:
            fail(key, "missing")
    coord = scene["coord"]
    if coord.ndim != 2 or coord.shape[1] != 3:
        fail("coord", f"expected shape (N, 3), got {coord.shape}")
    n = coord.shape[0]
    if n == 0:
        fail("coord", "scene has zero points")
    if not np.isfinite(coord).all():
        fail("coord", f"{int((~np.isfinite(coord)).any(1).sum())} points have non-finite coordinates")
    for key, width in (("color", 3), ("normal", 3)):
        if key in scene and scene[key].shape != (n, width):
            fail(key, f"expected shape ({n}, {width}), got {scene[key].shape}")
    for key in ("label", "instance") + tuple(f"region_{m}" for m in region_methods(scene)):
        if key in scene and scene[key].shape != (n,):
            fail(key, f"expected shape ({n},), got {scene[key].shape}")
    tags = scene["tags"]
    if tags.ndim != 1 or (num_classes is not None and tags.shape[0] != num_classes):
        fail("tags", f"expected shape ({num_classes},), got {tags.shape}")
    v = num_views(scene)
    if v:
        h, w = scene["view_rgb"].shape[1:3]
        expect = {"view_rgb": (v, h, w, 3), "view_depth": (v, h, w), "view_pose": (v, 4, 4),
                  "view_intrinsics": (v, 3, 3), "view_frame": (v,)}
        for key, shape in expect.items():
            if key not in scene:
                fail(key, "missing (scene has views)")
            if scene[key].shape != shape:
                fail(key, f"expected shape {shape}, got {scene[key].shape}")
