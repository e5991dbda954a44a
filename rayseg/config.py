"""Typed experiment configuration.

Every knob of rayseg is a field of one of the dataclasses below, with its default and a
docstring. Experiment files (TOML) hold only overrides of these defaults; a file may start with
``extends = "base.toml"`` (a path relative to the file) and may carry a ``[grid]`` table whose
keys are dotted field paths and whose values are lists (the Ray Tune ablation grid).

Loading is strict: an unknown key, a value of the wrong type or an impossible value raises
``ConfigError`` naming the dotted key and the file that set it.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SyntheticConfig:
    """Procedural indoor rooms with ray-cast RGB-D views (the embedded default dataset)."""

    profile: Literal["scannet20", "s3dis13"] = "scannet20"
    """Class set and room style: ScanNet-20 rooms, or S3DIS-13 rooms (ceiling, beams, columns...)."""
    num_scenes: int = 64
    """Number of scenes to generate."""
    val_fraction: float = 0.25
    """Fraction of scenes assigned to the val split (the rest are train)."""
    num_views: int = 8
    """Posed RGB-D views rendered per scene."""
    image_width: int = 320
    """Rendered view width in pixels."""
    image_height: int = 240
    """Rendered view height in pixels."""
    points_per_m2: float = 250.0
    """Surface sampling density; with the point limits below it sets the scene size."""
    min_points: int = 20_000
    """Lower bound on points per scene."""
    max_points: int = 150_000
    """Upper bound on points per scene."""
    seed: int = 0
    """Base seed; scene i is generated from (seed, i) alone, so generation is order-free."""
    hfov_deg: float = 60.0
    """Horizontal field of view of the rendered views, degrees (ScanNet's depth camera: ~58)."""
    coord_noise: float = 0.003
    """Std of Gaussian jitter on point coordinates, metres (scanner noise; 0 = exactly on surfaces)."""
    room_types: tuple[str, ...] = ()
    """Room types the scenes cycle through, e.g. ("bedroom", "office", "living_room"); empty = all of
    the profile's. Fewer types means fewer classes, each tagged in more scenes. Measured not to help
    the demo (3 of 7 types: 12.8 against 15.8 monitor mIoU at step 108; docs/results.md), which
    keeps all 7."""
    mix_p: float = 0.0
    """Probability that a room is also furnished by a second room type drawn at random (a studio
    flat: a bed and a fridge in one room). Scene tags are the method's only signal, and with
    every room furnished by one type they are largely decided by it (55 % of their entropy in the
    demo's rooms; bed only in bedrooms, toilet exactly in bathrooms: experiments/tag_statistics.py),
    so tags cannot tell a room type's typical objects apart. 0 = one type per room, scenes
    identical to folders prepared before the option."""
    door_p: float = 0.7
    """Probability that a room's door is in the scan. Real scans often miss it; a class tagged in
    every scene (like wall and floor, which only the removal augmentation teaches) cannot be
    localised from scene tags, so a door in every room would make 'door' unlearnable."""

    def __post_init__(self) -> None:
        _check(self.num_scenes > 0, "num_scenes", "must be > 0")
        _check(20.0 <= self.hfov_deg <= 120.0, "hfov_deg", "must be in [20, 120] degrees")
        _check(0.0 <= self.mix_p <= 1.0, "mix_p", "must be in [0, 1]")
        _check(0.0 <= self.coord_noise <= 0.02, "coord_noise", "must be in [0, 0.02] metres")
        _check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        _check(0.0 <= self.door_p <= 1.0, "door_p", "must be in [0, 1]")
        _check(self.num_views >= 0, "num_views", "must be >= 0")
        _check(self.image_width >= 8 and self.image_height >= 8, "image_width/height", "must be >= 8")
        _check(self.points_per_m2 > 0, "points_per_m2", "must be > 0")
        _check(0 < self.min_points <= self.max_points, "min_points", "must be > 0 and <= max_points")


@dataclass(kw_only=True)
class DataConfig:
    """Where the prepared dataset lives and how scenes become batches."""

    root: str = "data/synth"
    """Prepared dataset directory (Parquet shards + manifest.json)."""
    train_split: str = "train"
    """Split used for training and pseudo-labelling."""
    val_split: str = "val"
    """Split used for evaluation."""
    voxel_size: float = 0.04
    """Voxel edge in metres for stages cmg / cmg_rpc (0.04 ScanNet, 0.05 S3DIS)."""
    num_views: int = 6
    """Views sampled per scene (one from each of V contiguous chunks of the frame list); 0 = 3D only."""
    image_width: int = 320
    """Width the views are resized to before the 2D branch."""
    image_height: int = 240
    """Height the views are resized to before the 2D branch."""
    region_column: str = "shape_detection"
    """Partition method whose region ids feed RPC and pseudo-labels (shard columns region_<name> and
    view_region_<name>); '' = no regions (every id -1, floor/wall/ceiling removal skipped)."""
    max_points: int = 0
    """Randomly subsample training scenes to at most this many points (0 = keep all)."""
    voxel_feature: Literal["mean", "first"] = "mean"
    """A voxel's input features: the mean of its points' (rayseg) or its first point's (the
    reference keeps one point per voxel). The mean uses every point's colour and normal."""
    monitor_scenes: int = 8
    """First N train scenes (by id) whose GT is read, for evaluation only, to monitor pseudo-label
    mIoU during training. They are trained on like every other scene: pseudo-labels are made
    for training scenes, so that is where their quality is measured."""
    monitor_every: int = 1
    """Monitor every k-th epoch of a stage (and always its last), k = this. The monitor runs the
    teacher (and student) over the monitor scenes, 3D and 2D, and logs confusion images: in a
    short run on a laptop that is a real share of the time (~2.5 of the demo's 20 min at 216
    steps). Tune's per-epoch metrics need every epoch: sweeps with an epoch metric refuse k > 1."""
    monitor_student: bool = True
    """Also score the student's pseudo-labels on the monitor scenes (logged as student_pseudo_*),
    beside the EMA teacher's: in short runs the teacher lags the student by ~1 / (1 - ema_decay)
    steps, so the student shows first whether anything is learning."""
    loader: Literal["ray", "local"] = "ray"
    """'ray': each worker streams its scenes through Ray Data; 'local': the same per-scene
    pipeline in the worker process (fast unit tests, debugging)."""
    pseudo_labels: str = ""
    """Pseudo-label shard directory (output of `rayseg pseudo-label`) that stage seg trains on."""

    def __post_init__(self) -> None:
        _check(self.voxel_size > 0, "voxel_size", "must be > 0")
        _check(self.num_views >= 0, "num_views", "must be >= 0")
        _check(self.image_width >= 8 and self.image_height >= 8, "image_width/height", "must be >= 8")
        _check(self.max_points >= 0, "max_points", "must be >= 0")
        _check(self.monitor_scenes >= 0, "monitor_scenes", "must be >= 0")
        _check(self.monitor_every >= 1, "monitor_every", "must be >= 1")


@dataclass(kw_only=True)
class AugmentConfig:
    """METHOD.md augmentations. Teacher = weak view, student = strong view of the same scene."""

    enabled: bool = True
    """Master switch (off = identity transforms and no floor/wall/ceiling removal; Mix3D has its own)."""
    autocontrast_p: float = 0.2
    """Probability of chromatic auto-contrast."""
    color_translate_ratio: float = 0.1
    """Chromatic translation ratio."""
    color_jitter_std: float = 0.05
    """Chromatic jitter standard deviation (colours in [0, 1])."""
    hue_max: float = 0.5
    """Max hue shift of point colours as a fraction of the hue circle (drawn in [-hue_max, hue_max])."""
    saturation_max: float = 0.2
    """Max saturation shift."""
    teacher_rotate_z: float = 0.0872664626
    """Teacher z-rotation range, radians (pi/36)."""
    student_rotate_z: float = 0.5235987756
    """Student z-rotation range, radians (pi/6)."""
    flip_xy: bool = True
    """Random x/y flips (teacher and student)."""
    rotate_p: float = 0.5
    """Probability of each side's z-rotation (the reference: 0.5)."""
    chromatic_p: float = 0.95
    """Probability of each of chromatic translation and chromatic jitter (the reference: 0.95)."""
    voxel_shift: int = 100
    """Each step shifts the student's and the teacher's voxel coordinates by their own random
    integer offset in [0, voxel_shift) per axis, so that the networks do not learn the parity of
    coordinates (the reference: 100). 0 = no shift."""
    student_scale_min: float = 0.8
    """Student random scale lower bound."""
    student_scale_max: float = 1.2
    """Student random scale upper bound."""
    point_jitter_sigma: float = 0.005
    """Student per-point jitter sigma, metres."""
    point_jitter_clip: float = 0.02
    """Student per-point jitter clip, metres."""
    remove_floor_p: float = 0.5
    """Probability of dropping the floor region (and clearing its tag)."""
    remove_wall_p: float = 0.5
    """Probability of dropping the walls: the biggest region along each of the 4 sides, clearing the wall tag."""
    remove_ceiling_p: float = 0.0
    """Probability of dropping the ceiling region (S3DIS: 0.5)."""
    mix3d: bool = False
    """Mix3D: the student sees two scenes overlaid (tags OR-ed, cross-scene links invalid). Off
    as in the reference's released configs (mix3d 0.0); Table 2's '+Mix3D' row turns it on."""
    mix3d_max_offset: float = 1.0
    """Mix3D: the second scene is shifted in x and y by up to this many metres (whole voxels)."""
    removal_2d: bool = True
    """Extend floor/wall/ceiling removal to the 2D branch: pixels showing a removed region leave the
    2D classification pooling (and 2D RPC) and the views' tags are cleared like the points'. Off =
    the reference behaviour (views keep every tag); a 2D branch trained from scratch then cannot
    tell wall/floor pixels from others, since those classes are tagged in every scene."""
    removal_band: float = 0.5
    """Floor/wall/ceiling removal looks for the biggest region within this many metres of each face."""
    chromatic_teacher: bool = True
    """Apply the chromatic point-colour augmentations to the teacher too. The student's chromatic
    augmentation is applied on top of the teacher's colours (the reference's order)."""
    view_jitter_student: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)
    """Image colour jitter for the student: brightness, contrast, saturation, hue."""
    view_jitter_teacher: tuple[float, float, float, float] = (0.15, 0.15, 0.15, 0.05)
    """Image colour jitter for the teacher (half of the student's)."""

    def __post_init__(self) -> None:
        _check(self.voxel_shift >= 0, "voxel_shift", "must be >= 0")
        for name in ("autocontrast_p", "rotate_p", "chromatic_p", "remove_floor_p", "remove_wall_p",
                     "remove_ceiling_p"):
            _check(0.0 <= getattr(self, name) <= 1.0, name, "is a probability, must be in [0, 1]")
        _check(self.mix3d_max_offset >= 0, "mix3d_max_offset", "must be >= 0")
        _check(self.removal_band > 0, "removal_band", "must be > 0")
        _check(0 < self.student_scale_min <= self.student_scale_max, "student_scale_min",
               "must be > 0 and <= student_scale_max")


@dataclass(kw_only=True)
class PartitionConfig:
    """Unsupervised region partitions (Table 4). Each method writes shard column region_<method>."""

    method: Literal["pointwise", "vccs", "region_growing", "vccs_rg", "shape_detection", "gt"] = "shape_detection"
    """Default method computed by `rayseg partition` when none is given."""
    knn: int = 12
    """Neighbours for normals, curvature and region growing."""
    vccs_voxel_resolution: float = 0.03
    """VCCS voxel resolution, metres."""
    vccs_seed_resolution: float = 0.25
    """VCCS seed resolution, metres."""
    vccs_color_weight: float = 0.2
    """VCCS colour distance weight."""
    vccs_spatial_weight: float = 0.4
    """VCCS spatial distance weight."""
    vccs_normal_weight: float = 1.0
    """VCCS normal distance weight."""
    rg_smoothness_deg: float = 15.0
    """Region growing: max angle between neighbouring normals, degrees."""
    rg_curvature_threshold: float = 0.05
    """Region growing: points with curvature above this do not seed/extend regions."""
    rg_min_size: int = 50
    """Region growing: regions smaller than this are dissolved."""
    sd_max_distance: float = 0.03
    """Shape detection: max point-to-plane distance, metres."""
    sd_max_angle_deg: float = 20.0
    """Shape detection: max angle between point normal and plane normal, degrees."""
    sd_min_size: int = 50
    """Shape detection: minimum region size, in points (scale it with the point density: 50 suits
    2 cm scans; smaller regions dissolve into their nearest neighbour region)."""
    sd_seed_spacing: float = 0.5
    """Shape detection: one growth seed per cube of this edge, metres (coplanar seeds merge)."""
    view_stride: int = 2
    """2D regions: partition every view_stride-th pixel in x and y; the others take the region of
    the nearest (in 3D) sampled pixel. 1 = every pixel."""
    gt_view_tolerance: float = 0.05
    """gt oracle only: a pixel takes the instance of the nearest scene point within this many metres."""

    def __post_init__(self) -> None:
        _check(self.knn >= 3, "knn", "must be >= 3")
        for name in ("rg_min_size", "sd_min_size"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("rg_smoothness_deg", "sd_max_angle_deg"):
            _check(0 < getattr(self, name) <= 90, name, "must be in (0, 90] degrees")
        _check(self.rg_curvature_threshold >= 0, "rg_curvature_threshold", "must be >= 0")
        for name in ("vccs_color_weight", "vccs_spatial_weight", "vccs_normal_weight"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("sd_seed_spacing", "gt_view_tolerance"):
            _check(getattr(self, name) > 0, name, "must be > 0")
        _check(self.view_stride >= 1, "view_stride", "must be >= 1")
        for name in ("vccs_voxel_resolution", "vccs_seed_resolution", "sd_max_distance"):
            _check(getattr(self, name) > 0, name, "must be > 0")
        _check(self.vccs_seed_resolution >= self.vccs_voxel_resolution, "vccs_seed_resolution",
               "must be >= vccs_voxel_resolution")


@dataclass(kw_only=True)
class ModelConfig:
    """The two branches and their projection heads (Table 5, Table 7)."""

    backbone_3d: Literal["MinkUNet14A", "MinkUNet18A", "MinkUNet18C", "MinkUNet34C"] = "MinkUNet18A"
    """3D MinkUNet variant for stages cmg / cmg_rpc."""
    backend: Literal["torch", "minkowski"] = "torch"
    """Sparse convolution backend: pure PyTorch (always available) or MinkowskiEngine."""
    backbone_2d: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    """2D ResNet (dilated, output stride 8; resnet18 is the cheap choice on CPUs)."""
    signed_2d_features: bool = True
    """The reference's 2D layout: the stem is conv1 -> bn1 -> maxpool (no ReLU) and the last block
    of layer4 has no ReLU, so the 2D features (the guidance targets) keep their sign. False =
    torchvision's rectified layout (ReLU in the stem and after every block)."""
    init_2d: str = "imagenet"
    """2D initialisation: 'imagenet', 'none', or a path to a local state dict (torchvision/DINO/MoCo)."""
    init_2d_classifier: bool = False
    """Also start the 2D classifier from init_2d's `classifier.weight`, which only a per-pixel
    stand-in of the same classes holds (`rayseg pretrain-2d --set pretrain_2d.task=pixels`): the
    2D branch then starts out segmenting, taught by labels of the stand-in's own rooms (never the
    benchmark's). A diagnostic of what guidance carries into 3D when 2D knows the classes; the
    paper's 2D init is a backbone only."""
    freeze_2d: bool = False
    """Freeze the 2D backbone (Table 7 'frozen')."""
    autocast_2d: Literal["none", "bfloat16"] = "none"
    """Run the 2D backbone and classifier under torch.autocast in bfloat16 (mixed precision; the
    outputs come back in float32 before upsampling, sampling and the losses). Faster on GPUs and
    on CPUs with bf16 matrix units (measured 1.5x on the demo's whole step here, the 2D branch
    being half of it), but not the reference's float32 arithmetic: off by default. bfloat16 keeps
    float32's range, so no loss scaling is needed."""
    in_channels: int = 6
    """3D input features: colour/127.5-1 and the normal."""
    init_3d: str = ""
    """Optional MinkUNet state dict (either backend, e.g. a MinkowskiEngine checkpoint) to start
    the 3D branch from; '' = random init."""

    def __post_init__(self) -> None:
        _check(self.in_channels > 0, "in_channels", "must be > 0")
        _check(self.init_2d.strip() != "", "init_2d", "must be 'imagenet', 'none' or a checkpoint path")
        _check(not self.init_2d_classifier or self.init_2d not in ("imagenet", "none"), "init_2d_classifier",
               "needs init_2d = a checkpoint holding classifier.weight (a per-pixel stand-in)")


@dataclass(kw_only=True)
class GuidanceConfig:
    """Cross-modal guidance (Table 3). 3D->2D uses proj2d against detached 3D features."""

    loss_3d: Literal["contrastive", "mse", "affinity", "cam", "fused", "none"] = "contrastive"
    """Guidance loss on the 3D branch (2D teaches 3D); 'none' disables Lcon3D. 'fused' is not in
    the paper: 'cam' with both branches' averaged probabilities as the target (losses.fused_guidance)."""
    loss_2d: Literal["contrastive", "mse", "affinity", "cam", "fused", "none"] = "contrastive"
    """Guidance loss on the 2D branch (3D teaches 2D); 'none' disables Lcon2D."""
    alpha: float = 0.05
    """Weight of both guidance losses."""
    temperature: float = 0.07
    """InfoNCE temperature tau."""
    max_pairs: int = 512
    """Point-pixel pairs drawn per scene from its pool of links, separately for each direction."""
    max_links_per_view: int = 512
    """A scene's pool of links holds at most this many links (one per voxel) of each view."""
    min_links_per_view: int = 64
    """Views with at most this many links are skipped (the reference keeps a view with > 64)."""
    warmup_steps: int = 2400
    """Linear warm-up of alpha over the first steps of stage cmg (not restarted in cmg_rpc)."""
    scene_reduction: Literal["sum", "mean"] = "sum"
    """How the per-scene guidance losses of a batch combine. 'sum' (the reference): summed over the
    scenes of the global batch (optim.batch_size), however many workers share it, so at the
    reference's 4 scenes the guidance gradient is 4x that of 'mean' (the average over scenes)."""

    def __post_init__(self) -> None:
        _check(self.alpha >= 0, "alpha", "must be >= 0")
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(self.max_pairs > 0, "max_pairs", "must be > 0")
        _check(self.max_links_per_view > 0, "max_links_per_view", "must be > 0")
        _check(self.min_links_per_view >= 0, "min_links_per_view", "must be >= 0")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")


@dataclass(kw_only=True)
class RPCConfig:
    """Region-point consistency with the EMA teacher (Table 8)."""

    enabled_3d: bool = True
    """Lrpc3D (active in stage cmg_rpc only)."""
    enabled_2d: bool = True
    """Lrpc2D on pixel regions (active in stage cmg_rpc only)."""
    beta: float = 1.0
    """Weight of both RPC losses."""
    eta: float = 0.8
    """Threshold scale: T[c] = eta * Q[c] / max(Q) (adaptive) or eta (fixed)."""
    mode: Literal["region", "point"] = "region"
    """'region': teacher probabilities mean-pooled within regions; 'point': no pooling. Also
    governs the monitor's and `rayseg pseudo-label`'s labels, so a 'point' row of Table 8 is
    point-wise end to end (METHOD's pseudo-labels always pool: keep 'region' for those)."""
    threshold: Literal["adaptive", "fixed"] = "adaptive"
    """Adaptive (class-count-scaled) or fixed threshold."""
    ema_decay: float = 0.999
    """EMA teacher decay (weights and BN buffers)."""
    ema_ramp: bool = False
    """Mean Teacher's ramp: the decay at global step t is min(ema_decay, 1 - 1/(t + 1)), so the teacher
    is the average of the students so far instead of keeping ema_decay^t of its random init. Off =
    the reference's fixed decay (harmless over its ~90k steps); short schedules need it: at a fixed
    0.99 the demo's teacher still held 0.99^90 = 40 % of its random init after 90 steps, and scored
    3.6 pseudo-label mIoU beside the student's 14.7 (synthetic, measured)."""
    warmup_steps: int = 2400
    """Linear warm-up of beta over the first steps of stage cmg_rpc."""
    student_classes: Literal["all", "tagged"] = "all"
    """Classes of the student's softmax in the RPC cross-entropy. 'all': the reference's (every
    class; untagged classes are pushed down at every row, on top of Lcls). 'tagged': only the
    row's scene-tagged classes, like the teacher's masked softmax, so RPC only decides between
    classes the scene has."""
    teacher_bn: Literal["eval", "batch_first_epoch"] = "eval"
    """BatchNorm mode of the EMA teacher. 'eval': running statistics always. 'batch_first_epoch':
    the reference's behaviour, where the teacher is built in train mode and only its first
    validation (after the first epoch of each stage) switches it to eval, so during each stage's
    first epoch it normalises with batch statistics. rayseg keeps 'eval': the reference's mode is
    a side effect of when it validates, and batch statistics make RPC targets depend on the batch."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.eta <= 1.0, "eta", "must be in [0, 1]")
        _check(self.beta >= 0, "beta", "must be >= 0")
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")


@dataclass(kw_only=True)
class LossConfig:
    """Eq. 9: L = Lcls3D + Lcls2D + alpha(Lcon3D + Lcon2D) + beta(Lrpc3D + Lrpc2D)."""

    cls_3d: bool = True
    """Multi-label classification on average-pooled 3D logits."""
    cls_2d: bool = True
    """Multi-label classification on average-pooled 2D logits."""
    cls_warmup_steps: int = 2400
    """Linear warm-up of both cls weights over the first steps of stage cmg (the reference's
    warm_iter_cam; not restarted in cmg_rpc). 0 = full weight from the first step."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    rpc: RPCConfig = field(default_factory=RPCConfig)

    def __post_init__(self) -> None:
        _check(self.cls_warmup_steps >= 0, "cls_warmup_steps", "must be >= 0")


@dataclass(kw_only=True)
class OptimConfig:
    """SGD with a per-step poly schedule; the three stages of METHOD.md."""

    batch_size: int = 4
    """Scenes per step (global, split across workers)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """SGD weight decay."""
    poly_power: float = 0.9
    """Poly learning-rate schedule power."""
    cmg_epochs: int = 50
    """Stage cmg epochs."""
    cmg_lr: float = 0.1
    """Stage cmg learning rate."""
    cmg_rpc_epochs: int = 25
    """Stage cmg_rpc epochs (continues from cmg: student and teacher)."""
    cmg_rpc_lr: float = 0.05
    """Stage cmg_rpc learning rate."""
    lr_scale_2d_backbone: float = 1.0
    """Learning-rate multiplier of the 2D ResNet backbone in stages cmg / cmg_rpc (its 1x1 classifier
    and the projection heads keep the stage's lr). 1 = the reference (one lr for both branches, over
    ~90k steps). A short run that starts from pretrained 2D weights wants less: at lr 0.1 the 2D
    stand-in's pseudo-label mIoU fell from 12.0 to 5.5 in 27 demo steps (synthetic, measured)."""
    cmg_rpc_init: Literal["last", "best_val"] = "last"
    """Weights stage cmg_rpc starts from: stage cmg's last epoch (rayseg), or its epoch with the best
    3D mIoU on the val split ('best_val', the reference's `model_best`). 'best_val' selects a
    model with val ground truth: an ORACLE, tagged rayseg.oracle=true, never a default."""
    loops_per_epoch: int = 4
    """Passes over the train split per epoch (reference: 4)."""
    seg_epochs: int = 100
    """Stage seg epochs (fresh MinkUNet, cross-entropy on pseudo-labels)."""
    seg_lr: float = 0.1
    """Stage seg learning rate."""
    seg_backbone: Literal["MinkUNet14A", "MinkUNet18A", "MinkUNet18C", "MinkUNet34C"] = "MinkUNet18C"
    """Stage seg network."""
    seg_voxel_size: float = 0.02
    """Stage seg voxel size, metres."""

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "batch_size", "must be > 0")
        for name in ("cmg_epochs", "cmg_rpc_epochs", "seg_epochs"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(self.loops_per_epoch > 0, "loops_per_epoch", "must be > 0")
        for name in ("cmg_lr", "cmg_rpc_lr", "seg_lr", "seg_voxel_size"):
            _check(getattr(self, name) > 0, name, "must be > 0")


@dataclass(kw_only=True)
class RayConfig:
    """Ray cluster and resources. Defaults suit a 2-core laptop; clusters override."""

    address: str = ""
    """Ray address; '' starts an embedded local Ray (or joins RAY_ADDRESS when set)."""
    num_workers: int = 0
    """Ray Train workers (0 = run the loop in the driver process, no DDP)."""
    cpus_per_worker: float = 0.5
    """CPUs per training worker (fractional so Ray Data is not starved on small machines)."""
    use_gpu: bool = False
    """One GPU per worker; NCCL instead of gloo."""
    data_block_mb: int = 16
    """Ray Data target max block size, MiB (scene-sized rows)."""
    data_task_cpus: float = 1.0
    """CPUs each Ray Data sample task (read a shard, decode, augment) asks Ray for."""
    max_failures: int = 2
    """Ray Train FailureConfig.max_failures (resume from the last checkpoint)."""
    inference_actors: int = 1
    """Actor pool size for pseudo-label batch inference."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "num_workers", "must be >= 0")
        _check(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        _check(self.data_block_mb > 0, "data_block_mb", "must be > 0")
        _check(self.data_task_cpus > 0, "data_task_cpus", "must be > 0")
        _check(self.inference_actors > 0, "inference_actors", "must be > 0")


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow tracking."""

    uri: str = ""
    """Tracking URI; '' = sqlite:///<runs_dir>/mlflow.db."""
    experiment: str = "rayseg"
    """MLflow experiment name."""
    runs_dir: str = "runs"
    """Directory for run outputs (checkpoints, pseudo-labels, the default sqlite store)."""
    keep_checkpoints: int = 2
    """Newest epoch checkpoints kept per run (and by Ray Train); older ones are deleted once a
    newer one is complete; the last of each finished stage stays too (stage cmg's last is where
    `rayseg train --from` branches). Each holds student, teacher and optimizer state (~340 MB with
    the demo's networks, GBs with ResNet-50), so keeping every epoch fills disks. 0 = keep all."""
    system_metrics: bool = True
    """Log CPU / memory / disk / network (GPU where pynvml finds one) of rank 0 into each stage
    run (MLflow's "System metrics" tab)."""
    system_metrics_interval: float = 10.0
    """Seconds between system-metric samples."""
    log_models: bool = True
    """Log the EMA teacher (end of `rayseg train`) and the segmenter (end of `rayseg segment`) as
    MLflow models (`mlflow.pytorch.load_model`, `rayseg predict`)."""
    register_models: bool = False
    """Also register them in the model registry as '<name>-teacher' / '<name>-segmenter'."""

    def __post_init__(self) -> None:
        _check(self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0 (0 = keep all)")
        _check(self.system_metrics_interval > 0, "system_metrics_interval", "must be > 0 seconds")


TUNE_EPOCH_METRICS = ("pseudo_miou_3d", "pseudo_miou_2d")
"""Reported by the training loop every epoch (teacher pseudo-labels on the monitor subset)."""
TUNE_FINAL_METRICS = ("pseudo_final_miou_3d", "pseudo_final_miou_2d", "val_miou_3d")
"""Reported once at the end of a trial (all train scenes; val_miou_3d needs tune.with_seg)."""


@dataclass(kw_only=True)
class TuneConfig:
    """Ray Tune sweep settings (the grid itself is the file's [grid] table)."""

    max_concurrent: int = 0
    """Max concurrent trials (0 = derived from the cluster's CPUs/GPUs and the trial's resources)."""
    max_failures: int = 1
    """Retries per failed trial (a retried trial resumes from its newest checkpoint)."""
    asha: bool = False
    """ASHA early stopping on the monitored pseudo-label mIoU."""
    metric: str = "pseudo_miou_3d"
    """Metric Tune optimises/reports (never a val metric by default): one of TUNE_EPOCH_METRICS
    (per epoch, monitor subset) or TUNE_FINAL_METRICS (end of trial only)."""
    with_seg: bool = False
    """After pseudo-labelling, also train stage seg on the trial's pseudo-labels and evaluate it on
    val (val_miou_3d). Off: a trial ends with the pseudo-label mIoU (what Tables 2-8 report)."""
    share_stage1: bool = True
    """Trials whose stage-cmg settings are equal (e.g. Table 8's rows, which differ only in RPC)
    train stage cmg once, in <sweep>/stage1/<key>/, and branch from its last checkpoint (hard
    links, no copy). Off with ASHA, which needs every trial's stage-cmg epochs reported."""
    stage1_dir: str = ""
    """Where shared stage-cmg runs live: empty = <sweep>/stage1. A folder named here is shared by
    every sweep that names it, so a later sweep of stage-cmg_rpc settings (thresholds, RPC
    branches, its lr) branches from a stage cmg an earlier sweep trained. Safe: each run sits
    under a digest of every setting that acts in stage cmg (data.root and seed included)."""
    asha_grace_epochs: int = 1
    """ASHA: epochs every trial runs before it may be stopped."""
    asha_reduction_factor: int = 2
    """ASHA: keep the top 1/factor of trials at each rung."""

    def __post_init__(self) -> None:
        _check(self.max_concurrent >= 0, "max_concurrent", "must be >= 0 (0 = from the cluster)")
        _check(self.max_failures >= 0, "max_failures", "must be >= 0")
        known = TUNE_EPOCH_METRICS + TUNE_FINAL_METRICS
        _check(self.metric in known, "metric", f"must be one of {list(known)}, got {self.metric!r}")
        _check(not (self.asha and self.metric not in TUNE_EPOCH_METRICS), "asha",
               f"ASHA needs a per-epoch metric (tune.metric in {list(TUNE_EPOCH_METRICS)})")
        _check(self.asha_grace_epochs >= 1, "asha_grace_epochs", "must be >= 1")
        _check(self.asha_reduction_factor >= 2, "asha_reduction_factor", "must be >= 2")


@dataclass(kw_only=True)
class Pretrain2DConfig:
    """`rayseg pretrain-2d`: a STAND-IN for ImageNet weights, trained offline on object crops of
    synthetic rooms of their own seed (rayseg/pretrain2d.py). `model.init_2d` = the file it writes."""

    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet34"
    """torchvision ResNet to train (use the experiment's model.backbone_2d)."""
    task: Literal["crops", "pixels"] = "crops"
    """'crops': classify object crops, one label per image (the ImageNet analogue). 'pixels': the
    2D branch's own dilated network trained on the corpus views' per-pixel labels (the analogue of
    a segmentation-pretrained backbone: more 2D knowledge than ImageNet gives; steps and batch_size
    then count views, e.g. 600 x 16)."""
    seed: int = 7_000_001
    """Seed of the corpus rooms: keep it apart from every benchmark / demo `synthetic.seed`."""
    rooms: int = 400
    """Corpus rooms (400 give ~11.8k crops in ~90 s)."""
    views_per_room: int = 6
    """Rendered views per room."""
    image_width: int = 160
    """Rendered view width."""
    image_height: int = 120
    """Rendered view height."""
    crop_size: int = 64
    """Crops are resized to this square size."""
    min_pixels: int = 60
    """A class component needs this many pixels to give a crop."""
    margin: float = 0.15
    """Crop margin around the component's bounding box, as a fraction of its side."""
    max_crops_per_class: int = 6
    """At most this many crops of one class per room (walls and floors would swamp the corpus)."""
    steps: int = 2000
    """SGD steps (ResNet-18, 400 rooms: held-out crop accuracy 55 % at 2000 steps; ResNet-34, 160
    rooms: 39 % at 900, synthetic, measured)."""
    batch_size: int = 64
    """Crops per step."""
    lr: float = 0.05
    """Initial learning rate (cosine decay to 0)."""
    cache_dir: str = "~/.cache/rayseg/pretrain2d"
    """Where the default output is cached (one file per settings)."""

    def __post_init__(self) -> None:
        for name in ("rooms", "views_per_room", "steps", "batch_size", "max_crops_per_class"):
            _check(getattr(self, name) > 0, name, "must be > 0")
        _check(self.crop_size >= 16, "crop_size", "must be >= 16")
        _check(self.min_pixels >= 1, "min_pixels", "must be >= 1")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(0 <= self.margin <= 1, "margin", "must be in [0, 1]")


@dataclass(kw_only=True)
class Config:
    """A whole experiment."""

    name: str = "experiment"
    """Experiment name (MLflow experiment and run directory prefix)."""
    seed: int = 0
    """Global seed (deterministic on one device)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    pretrain_2d: Pretrain2DConfig = field(default_factory=Pretrain2DConfig)


# --------------------------------------------------------------------------------------------
# Building dataclasses from nested dicts, strictly
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return value as type tp or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        _check(len(value) == len(args), key, f"expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a table, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected bool, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected int, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected float, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected str, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown key (known keys of [{prefix.rstrip('.') or 'top level'}]: "
                              f"{', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def to_dict(cfg: Any) -> dict:
    """Nested plain dict of a config (tuples become lists, TOML-ready)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (for MLflow params and error messages)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for dotted, v in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {p} is a value, not a table")
        node[leaf] = v
    return out


# --------------------------------------------------------------------------------------------
# Files, overrides, grids
# --------------------------------------------------------------------------------------------


@dataclass
class Experiment:
    """A resolved experiment: the config, the grid for Tune, and where each key came from."""

    config: Config
    grid: dict[str, list] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    path: str | None = None


def _read_toml(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str], dict[str, list]]:
    """Flat values, their source files and the grid of a TOML file, following `extends`."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path in chain:
        raise ConfigError(f"{path}: circular extends ({' -> '.join(str(p) for p in chain + (path,))})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    sources: dict[str, str] = {}
    grid: dict[str, list] = {}
    parent = raw.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends must be a string path")
        flat, sources, grid = _read_toml(path.parent / parent, chain + (path,))
    own_grid = raw.pop("grid", {})
    if not isinstance(own_grid, dict):
        raise ConfigError(f"{path}: [grid] must be a table")
    for k, v in flatten(own_grid).items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{path}: grid.{k}: must be a non-empty list of values")
        grid[k] = v
    for k, v in flatten(raw).items():
        flat[k] = v
        sources[k] = str(path)
    return flat, sources, grid


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', value); the value is read as TOML, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. loss.rpc.eta=0.7")
    key, _, raw = text.partition("=")
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def build(flat: dict[str, Any], sources: dict[str, str] | None = None) -> Config:
    """Config from flat dotted overrides; errors name the key and the file that set it."""
    sources = sources or {}
    try:
        return _build(Config, _unflatten(flat))
    except ConfigError as exc:
        msg = str(exc)
        key = msg.split(":", 1)[0]
        where = sources.get(key) or next((s for k, s in sources.items() if key.startswith(k) or k.startswith(key)), None)
        raise ConfigError(f"{msg} (set in {where})" if where else msg) from None


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Experiment:
    """Load an experiment file (or the defaults) and apply `--set` overrides, strictly."""
    flat: dict[str, Any] = {}
    sources: dict[str, str] = {}
    grid: dict[str, list] = {}
    if path is not None:
        flat, sources, grid = _read_toml(Path(path))
    for text in overrides:
        key, value = parse_override(text)
        flat[key] = value
        sources[key] = f"--set {text}"
    cfg = build(flat, sources)
    exp = Experiment(config=cfg, grid=grid, sources=sources, path=str(path) if path else None)
    for point in grid_points(exp):  # validate every grid value before anything runs
        apply(exp, point, source=f"{path} [grid]")
    return exp


GRID_ROWS = "rows"
"""[grid] key of explicit points: ``[[grid.rows]]`` tables of dotted keys, for ablations whose rows
are not a product (e.g. Table 2's component rows). Every row is combined with every point of the
product of the other [grid] keys."""


def grid_points(exp: Experiment) -> list[dict[str, Any]]:
    """The [grid] as a list of {dotted_key: value}: the Cartesian product of its list-valued keys,
    times its explicit rows (rows outermost, in file order)."""
    keys = [k for k in exp.grid if k != GRID_ROWS]
    rows: list[dict[str, Any]] = [{}]
    if GRID_ROWS in exp.grid:
        rows = []
        for i, row in enumerate(exp.grid[GRID_ROWS]):
            if not isinstance(row, dict) or not row:
                raise ConfigError(f"grid.rows[{i}]: must be a non-empty table of dotted keys, got {row!r} "
                                  f"(set in {exp.path})")
            flat_row = flatten(row)
            clash = sorted(set(flat_row) & set(keys))
            if clash:
                raise ConfigError(f"grid.rows[{i}]: {clash} also listed as [grid] product keys (set in {exp.path})")
            rows.append(flat_row)
    product = [dict(zip(keys, combo)) for combo in itertools.product(*(exp.grid[k] for k in keys))]
    return [{**point, **row} for row in rows for point in product]


def apply(exp: Experiment, point: dict[str, Any], source: str = "grid") -> Config:
    """The experiment's config with a grid point (dotted overrides) applied and validated."""
    flat = flatten(to_dict(exp.config))
    sources = dict(exp.sources)
    for k, v in point.items():
        if k not in flat:
            raise ConfigError(f"{k}: unknown key (set in {source})")
        flat[k] = v
        sources[k] = source
    return build(flat, sources)


def dumps(cfg: Config) -> str:
    """The fully resolved config as TOML."""
    return tomli_w.dumps(to_dict(cfg))


# Config values that are paths: made absolute where a config leaves the directory it was read
# from (Tune runs trials in their own working directories; a resumed sweep may be started from
# another directory; `rayseg train --from` compares a stored run's settings with this one's).
PATH_KEYS = ("data.root", "data.pseudo_labels", "tracking.runs_dir", "model.init_2d", "model.init_3d",
             "tune.stage1_dir")


def absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """Flat values with every PATH_KEYS entry that is a relative path made absolute (from the
    cwd, as every rayseg command reads them)."""
    out = dict(values)
    for key in PATH_KEYS:
        value = out.get(key)
        if not isinstance(value, str) or not value or (key == "model.init_2d" and value in ("imagenet", "none")):
            continue
        out[key] = str(Path(value).expanduser().resolve())
    return out


def replace(cfg: Config, **dotted: Any) -> Config:
    """Copy of cfg with dotted-key overrides, e.g. replace(cfg, **{'optim.cmg_epochs': 1})."""
    flat = flatten(to_dict(copy.deepcopy(cfg)))
    for k, v in dotted.items():
        if k not in flat:
            raise ConfigError(f"{k}: unknown key")
        flat[k] = v
    return build(flat)
