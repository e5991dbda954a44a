"""The tiny experiment the end-to-end tests share: small synthetic scenes, MinkUNet14A + ResNet-18
from scratch, one epoch per stage (the plumbing is under test, not the method), as flat dotted
config keys, plus `toml_text` for the tests that run the CLI or Ray Tune on a file."""

from __future__ import annotations

from typing import Any

import tomli_w

# Networks, losses, schedule and resources: what every end-to-end test uses.
TINY_RUN = {
    "data.voxel_size": 0.08, "data.image_width": 64, "data.image_height": 48, "data.loader": "local",
    "model.backbone_3d": "MinkUNet14A", "model.backbone_2d": "resnet18", "model.init_2d": "none",
    "loss.cls_warmup_steps": 2, "loss.guidance.warmup_steps": 2, "loss.rpc.warmup_steps": 2, "loss.rpc.ema_decay": 0.9,
    "optim.batch_size": 2, "optim.cmg_epochs": 1, "optim.cmg_rpc_epochs": 1, "optim.loops_per_epoch": 1,
    "optim.seg_epochs": 1, "optim.seg_backbone": "MinkUNet14A", "optim.seg_voxel_size": 0.08,
    "ray.cpus_per_worker": 0.5,
}

# + 6 synthetic scenes (4 train, 2 val) with two 64 x 48 views used per scene.
TINY = {
    **TINY_RUN,
    "synthetic.num_scenes": 6, "synthetic.val_fraction": 0.34, "synthetic.num_views": 4,
    "synthetic.image_width": 64, "synthetic.image_height": 48, "synthetic.min_points": 2500,
    "synthetic.max_points": 4000, "synthetic.points_per_m2": 40.0,
    "data.num_views": 2, "data.monitor_scenes": 2,
    "optim.cmg_lr": 0.02, "optim.cmg_rpc_lr": 0.01, "optim.seg_lr": 0.02,
}


def toml_text(flat: dict[str, Any], grid: dict[str, list] | None = None) -> str:
    """An experiment file holding the flat dotted values (and a [grid] of dotted keys)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        table = nested
        for s in sections:
            table = table.setdefault(s, {})
        table[leaf] = value
    if grid:
        nested["grid"] = dict(grid)
    return tomli_w.dumps(nested)
