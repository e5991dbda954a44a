"""ORACLE diagnostic: what would region-point consistency teach the student, and is it right?

    .venv/bin/python experiments/rpc_targets.py RUN_DIR [--checkpoint DIR/state.pt] [--eta 0.8,0.95] [--out FILE]

RPC (Eq. 2-8) trains the student with cross-entropy towards the EMA teacher's region-pooled,
tag-masked argmax wherever that label's pooled probability passes the class threshold. It can only
help where those targets are right and the student is wrong. This script takes one checkpoint of a
training run (default: its last; `--checkpoint` picks another, e.g. the end of stage cmg, where RPC
is about to start) and, on every train room (un-augmented, "eval" mode; rows are points, where
training uses voxels), compares with the **ground truth**:

  - the teacher's labels point-wise and region-pooled (the latter are the pseudo-labels);
  - the RPC targets under each threshold: the run's own adaptive one (eta from its config; Q starts
    from the checkpoint's counts and is updated room by room, as one epoch of training would update
    it), and fixed thresholds at each `--eta`: the share of points kept, the accuracy of the kept
    targets, their mIoU (confusion over kept points only);
  - against the student's own tag-masked argmax at the same checkpoint, on the kept points: the
    share of all points where the target is right and the student wrong ("fixes") and where the
    target is wrong and the student right ("breaks"). Fixes < breaks means RPC, as the teacher
    stands, pulls the student away from GT on balance;
  - per class: GT share of points, region-pooled teacher IoU, and under the run's threshold the
    precision and recall of the kept targets of that class.

It reads GT labels: a diagnostic of the method's dynamics, not a method result; nothing from it
feeds training. On whatever data the run trained on (in this repository: synthetic rooms).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from rayseg import losses as L
from rayseg import metrics as M
from rayseg.config import replace as cfg_replace
from rayseg.data import shards
from rayseg.data.scene import IGNORE_LABEL
from rayseg.models.twobranch import TwoBranchModel
from rayseg.train.device import to_device
from rayseg.train.launch import load_run_checkpoint
from rayseg.train.loop import iter_rank_batches


def scene_rows(student: TwoBranchModel, teacher: TwoBranchModel, cfg, split: str):
    """Per train room: teacher and student point logits, the room's tag rows, regions and GT."""
    student.eval()
    teacher.eval()
    with torch.no_grad():
        for batch in iter_rank_batches(cfg, split, "eval", 0, 0, 1, 1):
            b = to_device(batch, torch.device("cpu"))
            n = b["inverse"].shape[0]
            yield {"teacher": teacher.forward_3d(b["coord"], b["feat"])["logits"][b["inverse"]],
                   "student": student.forward_3d(b["coord"], b["feat"])["logits"][b["inverse"]],
                   "tags": b["tags"][0].expand(n, -1), "region": b.get("region"), "label": b["label"].long()}


def summarise(conf: torch.Tensor, present: np.ndarray) -> float:
    """Mean IoU over the classes present in GT (`present`), a class absent from `conf` counting 0
    (kept-target mIoU: a class whose points were all dropped scores 0, not 'not present')."""
    return float(np.nan_to_num(M.iou_per_class(conf))[present].mean())


def analyse(rows: list[dict], num_classes: int, thresholds: dict[str, L.ThresholdState], mode: str) -> dict:
    conf_point = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    conf_region = torch.zeros_like(conf_point)
    conf_student = torch.zeros_like(conf_point)
    per = {name: {"kept": 0, "right": 0, "fixes": 0, "breaks": 0,
                  "conf": torch.zeros_like(conf_point)} for name in thresholds}
    total = 0
    for r in rows:
        y = r["label"]
        valid = y != IGNORE_LABEL  # pooling sees every point, the counts only labelled ones
        total += int(valid.sum())
        probs = L.masked_softmax(r["teacher"], r["tags"])
        conf_point += M.confusion_matrix(probs.argmax(1), y, num_classes)
        pooled = L.region_mean(probs, r["region"]) if r["region"] is not None else probs
        conf_region += M.confusion_matrix(pooled.argmax(1), y, num_classes)
        student_pred = L.masked_softmax(r["student"], r["tags"]).argmax(1)
        conf_student += M.confusion_matrix(student_pred, y, num_classes)
        for name, state in thresholds.items():
            target, kept = L.rpc_targets(r["teacher"], r["tags"], r["region"], state.thresholds(), mode)
            state.update(L.accepted_counts(target, kept, num_classes))
            p = per[name]
            right, student_right = target == y, student_pred == y
            kept = kept & valid
            p["kept"] += int(kept.sum())
            p["right"] += int((kept & right).sum())
            p["fixes"] += int((kept & right & ~student_right).sum())
            p["breaks"] += int((kept & ~right & student_right).sum())
            p["conf"] += M.confusion_matrix(target[kept], y[kept], num_classes)
    present = conf_region.sum(1).numpy() > 0  # conf[gt, pred]
    out = {"points": total, "teacher_point_miou": summarise(conf_point, present),
           "teacher_region_miou": summarise(conf_region, present),
           "student_point_miou": summarise(conf_student, present),
           "conf_region": conf_region, "thresholds": {}}
    for name, p in per.items():
        out["thresholds"][name] = {"kept": p["kept"] / total, "kept_accuracy": p["right"] / max(1, p["kept"]),
                                   "kept_miou": summarise(p["conf"], present), "fixes": p["fixes"] / total,
                                   "breaks": p["breaks"] / total, "conf": p["conf"]}
    return out


def class_table(result: dict, own: str, class_names: tuple[str, ...]) -> list[dict]:
    """Per class present in GT: its share of points, the region-pooled teacher's IoU, the
    precision / recall of the kept targets under threshold `own` (confusions are conf[gt, pred]),
    and the two classes its points are most often kept as instead (share of its points)."""
    conf_region = result["conf_region"].double()
    conf_kept = result["thresholds"][own]["conf"].double()
    gt, iou = conf_region.sum(1), M.iou_per_class(result["conf_region"])
    rows = []
    for c, name in enumerate(class_names):
        if gt[c] == 0:
            continue
        kept_pred, kept_right = float(conf_kept[:, c].sum()), float(conf_kept[c, c])
        rows.append({"class": name, "gt_share": float(gt[c] / gt.sum()), "teacher_region_iou": float(np.nan_to_num(iou[c])),
                     "kept_precision": kept_right / kept_pred if kept_pred else float("nan"),
                     "kept_recall": kept_right / float(gt[c]),
                     # where the class's points are sent instead: the two largest wrong kept targets
                     "kept_as": [(class_names[o], float(conf_kept[c, o] / gt[c]))
                                 for o in conf_kept[c].argsort(descending=True).tolist() if o != c][:2]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a training run directory (its config, and its last checkpoint by default)")
    parser.add_argument("--checkpoint", default=None, help="a state.pt of this run or its folder (e.g. the end of stage cmg)")
    parser.add_argument("--eta", default="0.8,0.95", help="comma-separated fixed thresholds to compare")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg, ckpt, state = load_run_checkpoint(args.run, args.checkpoint)
    cfg = cfg_replace(cfg, **{"data.loader": "local"})
    class_names = tuple(shards.load_manifest(cfg.data.root)["class_names"])
    nc = len(class_names)
    student, teacher = TwoBranchModel(cfg.model, nc), TwoBranchModel(cfg.model, nc)
    student.load_state_dict(state["student"])
    teacher.load_state_dict(state["teacher"])
    rpc = cfg.loss.rpc
    own = f"{rpc.threshold} eta {rpc.eta} (the run's)"
    thresholds = {own: L.ThresholdState.from_config(rpc, nc)}
    if "thresholds" in state:
        thresholds[own].load_state_dict(state["thresholds"]["3d"])
    for eta in (float(e) for e in args.eta.split(",") if e):
        thresholds[f"fixed eta {eta}"] = L.ThresholdState(nc, eta, adaptive=False)
    rows = list(scene_rows(student, teacher, cfg, cfg.data.train_split))
    result = analyse(rows, nc, thresholds, rpc.mode)
    print(f"ORACLE diagnostic (reads GT): {args.run} at {ckpt.parent.name}, {len(rows)} train rooms, "
          f"{result['points']} points, rpc mode {rpc.mode}")
    print(f"mIoU: teacher point-wise {100 * result['teacher_point_miou']:.1f}, teacher region-pooled (the "
          f"pseudo-labels) {100 * result['teacher_region_miou']:.1f}, student point-wise {100 * result['student_point_miou']:.1f}")
    print(f"{'threshold':<32}{'kept':>7}{'kept acc':>10}{'kept mIoU':>11}{'fixes':>8}{'breaks':>8}")
    for name, t in result["thresholds"].items():
        print(f"{name:<32}{t['kept']:>7.1%}{t['kept_accuracy']:>10.1%}{100 * t['kept_miou']:>11.1f}"
              f"{t['fixes']:>8.2%}{t['breaks']:>8.2%}")
    classes = class_table(result, own, class_names)
    print(f"\nper class, kept targets under {own}:")
    print(f"{'class':<16}{'GT share':>9}{'teacher IoU':>13}{'precision':>11}{'recall':>8}  kept as instead")
    for c in classes:
        instead = ", ".join(f"{name} {share:.0%}" for name, share in c["kept_as"])
        print(f"{c['class']:<16}{c['gt_share']:>9.1%}{100 * c['teacher_region_iou']:>13.1f}"
              f"{c['kept_precision']:>11.1%}{c['kept_recall']:>8.1%}  {instead}")
    if args.out:
        plain = {k: v for k, v in result.items() if k != "conf_region"}
        plain["thresholds"] = {k: {kk: vv for kk, vv in v.items() if kk != "conf"} for k, v in result["thresholds"].items()}
        Path(args.out).write_text(json.dumps({"run": args.run, "checkpoint": str(ckpt), "classes": classes, **plain}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
