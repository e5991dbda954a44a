"""Evaluation of a run on a split: mIoU, per-class IoU table (class names), confusion matrix,
3D and (for two-branch runs) 2D, printed and logged to the run's MLflow run.

- a seg run (stage seg): the segmentation network's argmax per point;
- a train run (stages cmg / cmg_rpc): the EMA teacher's 3D argmax per point and 2D argmax per
  pixel — no scene tags are used, since a deployed network never has them.
Model selection is always the run's last checkpoint: ground truth never picks a model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rayseg import losses as L
from rayseg import metrics as M


@torch.no_grad()
def evaluate_run(run_dir: str | Path, split: str | None = None, log: bool = True) -> dict:
    """Returns {"3d": confusion, "2d": confusion or None, "class_names": ..., "tables": str}."""
    from rayseg.train.launch import load_run_checkpoint
    from rayseg.train.device import to_device
    from rayseg.train.loop import build_models, iter_rank_batches
    from rayseg.train.stages import stage_config
    from rayseg.train.tracking import Tracker

    run_dir = Path(run_dir).resolve()
    cfg, _, state = load_run_checkpoint(run_dir)
    stages = state["stages"]
    class_names = tuple(state["class_names"])
    num_classes = len(class_names)
    split = split or cfg.data.val_split
    is_seg = stages == ["seg"]
    cfg = stage_config(cfg, "seg" if is_seg else "cmg")
    net, _ = build_models(cfg, num_classes, "seg" if is_seg else "cmg")
    net.load_state_dict(state["student"] if is_seg else state["teacher"])
    net.eval()
    device = torch.device("cpu")
    conf3 = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    conf2 = torch.zeros(num_classes, num_classes, dtype=torch.int64) if (not is_seg and cfg.data.num_views) else None
    scenes = 0
    for batch in iter_rank_batches(cfg, split, "eval", 0, 0, 1, 1):
        b = to_device(batch, device)
        if is_seg:
            _, logits = net(b["coord"], b["feat"])
        else:
            logits = net.forward_3d(b["coord"], b["feat"])["logits"]
        conf3 += M.confusion_matrix(logits[b["inverse"]].argmax(1), b["label"], num_classes)
        if conf2 is not None and b["images"].shape[0]:
            pred2 = L.flatten_pixels(net.forward_2d(b["images"])["logits"]).argmax(1)
            conf2 += M.confusion_matrix(pred2, b["view_label"].reshape(-1), num_classes)
        scenes += 1
    what = "segmentation network" if is_seg else "EMA teacher"
    tables = M.iou_table(conf3, class_names, title=f"{run_dir.name}: {what}, 3D, split {split} ({scenes} scenes)")
    if conf2 is not None:
        tables += "\n\n" + M.iou_table(conf2, class_names, title=f"{run_dir.name}: {what}, 2D views, split {split}")
    if log:
        tracker = Tracker(cfg, run_dir.name, run_id=state["progress"]["mlflow_run_id"])
        tracker.log_confusion(conf3, class_names, f"{split}_3d", state["progress"]["step"])
        if conf2 is not None:
            tracker.log_confusion(conf2, class_names, f"{split}_2d", state["progress"]["step"])
        tracker.end()
    return {"3d": conf3, "2d": conf2, "class_names": class_names, "tables": tables, "split": split}
