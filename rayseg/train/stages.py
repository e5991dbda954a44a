"""Which settings act in which stage: the data settings each stage trains with (shared by
training, evaluation and export without importing the training loop), and the settings a
finished stage cmg depends on (what lets runs share or branch from one)."""

from __future__ import annotations

import hashlib
import json

from rayseg import config as cfgmod

# Config keys that act only after stage cmg: runs that differ in nothing else can share stage cmg
# (Tune's share_stage1, `rayseg train --from`).
# Not here on purpose: loss.rpc.ema_decay (the EMA teacher is updated from the first step),
# loss.rpc.mode (the stage-cmg monitor pools with it), optim.cmg_rpc_init (decided by stage cmg).
AFTER_STAGE1_KEYS = frozenset({
    "optim.cmg_rpc_epochs", "optim.cmg_rpc_lr", "loss.rpc.enabled_3d", "loss.rpc.enabled_2d", "loss.rpc.beta",
    "loss.rpc.eta", "loss.rpc.threshold", "loss.rpc.warmup_steps", "loss.rpc.teacher_bn", "loss.rpc.student_classes",
    "data.pseudo_labels",
    "name"})
AFTER_STAGE1_PREFIXES = ("optim.seg_", "tune.", "tracking.")


def stage_config(cfg: cfgmod.Config, stage: str) -> cfgmod.Config:
    """The data settings a stage trains with: stage seg is 3D-only at its own voxel size, and
    plain supervised training on pseudo-labels: no Mix3D, and no floor/wall/ceiling removal (that
    augmentation exists to teach scene tags; here it would only throw away labelled points)."""
    if stage != "seg":
        return cfg
    return cfgmod.replace(cfg, **{"data.num_views": 0, "data.voxel_size": cfg.optim.seg_voxel_size,
                                  "augment.mix3d": False, "augment.remove_floor_p": 0.0,
                                  "augment.remove_wall_p": 0.0, "augment.remove_ceiling_p": 0.0})


def flat_settings(cfg: cfgmod.Config) -> dict:
    """Every setting as {dotted key: value}, paths made absolute (comparable across folders)."""
    return cfgmod.absolute_paths(cfgmod.flatten(cfgmod.to_dict(cfg)))


def stage1_settings(cfg: cfgmod.Config) -> dict:
    """Every flat setting that acts in stage cmg (all but AFTER_STAGE1_KEYS/_PREFIXES), paths
    made absolute. Of the Ray resources only the number of training processes counts (it sets the
    per-rank batch and the data split): 0 workers (local mode) and 1 are the same computation."""
    flat = flat_settings(cfg)
    acting = {k: v for k, v in flat.items()
              if k not in AFTER_STAGE1_KEYS and not k.startswith(AFTER_STAGE1_PREFIXES + ("ray.",))}
    acting["training_processes"] = max(1, cfg.ray.num_workers)
    return acting


def stage1_key(cfg: cfgmod.Config) -> str:
    """A digest of stage1_settings: equal for runs whose stage cmg is the same computation."""
    return hashlib.sha256(json.dumps(stage1_settings(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(a: dict, b: dict) -> dict[str, tuple]:
    """{key: (a's value, b's value)} for the flat keys whose values differ (missing = None)."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def stage1_differences(cfg: cfgmod.Config, other: cfgmod.Config) -> dict[str, tuple]:
    """{key: (cfg's value, other's value)} for the stage-cmg settings in which they differ."""
    return _differences(stage1_settings(cfg), stage1_settings(other))


def settings_differences(cfg: cfgmod.Config, other: cfgmod.Config) -> dict[str, tuple]:
    """{key: (cfg's value, other's value)} for every setting that differs, bookkeeping
    (name, tracking.*) aside, paths made absolute."""
    a, b = ({k: v for k, v in flat_settings(c).items() if k != "name" and not k.startswith("tracking.")}
            for c in (cfg, other))
    return _differences(a, b)
