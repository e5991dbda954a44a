"""Per-stage data settings: shared by training, evaluation and export without importing the
training loop."""

from __future__ import annotations

from rayseg import config as cfgmod


def stage_config(cfg: cfgmod.Config, stage: str) -> cfgmod.Config:
    """The data settings a stage trains with: stage seg is 3D-only at its own voxel size, and
    plain supervised training on pseudo-labels: no Mix3D, and no floor/wall/ceiling removal (that
    augmentation exists to teach scene tags; here it would only throw away labelled points)."""
    if stage != "seg":
        return cfg
    return cfgmod.replace(cfg, **{"data.num_views": 0, "data.voxel_size": cfg.optim.seg_voxel_size,
                                  "augment.mix3d": False, "augment.remove_floor_p": 0.0,
                                  "augment.remove_wall_p": 0.0, "augment.remove_ceiling_p": 0.0})
