"""ORACLE diagnostic: what each branch labels at the points both branches see.

    .venv/bin/python experiments/link_labels.py RUN_DIR [--checkpoint DIR/state.pt] [--out FILE]

Cross-modal guidance can only carry into 3D what the 2D branch knows. This script takes one
checkpoint of a training run (default: its last; `--checkpoint` picks another, e.g. the end of
stage cmg) and, on every train room (un-augmented, "eval" mode), compares with the **ground truth**
at the linked points (points that project into one of the room's views and pass the occlusion test;
a point seen by several views counts once per link):

  - 3D: the EMA teacher's tag-masked argmax of the point's logits;
  - 2D: the EMA teacher's tag-masked argmax of the logits at the link's pixel;
  - fused: the argmax of the mean of the two tag-masked softmax probabilities (a label-level
    transfer that no training step performs; it bounds what 2D knowledge adds at this checkpoint).

All point-wise, no region pooling. It reads GT labels: a diagnostic of the method's dynamics, not a
method result; nothing from it feeds training. On whatever data the run trained on (in this
repository: synthetic rooms).
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
from rayseg.models.twobranch import TwoBranchModel
from rayseg.train.device import to_device
from rayseg.train.launch import load_run_checkpoint
from rayseg.train.loop import iter_rank_batches


def labels_at_links(batch: dict, point_logits: torch.Tensor, view_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 3D, 2D and fused tag-masked argmax and the GT at each link of a one-room eval batch.
    point_logits (N, C) per point; view_logits (V, C, H, W) the 2D logits at image size."""
    links = batch["link_point"]
    tags = batch["tags"][0].expand(len(links), -1)
    hw = view_logits.shape[2] * view_logits.shape[3]
    p3 = L.masked_softmax(point_logits[links], tags)
    p2 = L.masked_softmax(L.flatten_pixels(view_logits)[batch["link_view"] * hw + batch["link_pixel"]], tags)
    return {"3d": p3.argmax(1), "2d": p2.argmax(1), "fused": ((p3 + p2) / 2).argmax(1),
            "gt": batch["label"][links].long()}


def link_confusions(teacher: TwoBranchModel, cfg, split: str, num_classes: int) -> dict[str, torch.Tensor]:
    """Confusion matrices (GT x predicted) of the 3D, 2D and fused labels over all links of the split."""
    conf = {k: torch.zeros(num_classes, num_classes, dtype=torch.long) for k in ("3d", "2d", "fused")}
    teacher.eval()
    with torch.no_grad():
        for batch in iter_rank_batches(cfg, split, "eval", 0, 0, 1, 1):
            b = to_device(batch, torch.device("cpu"))
            if not len(b["link_point"]):
                continue
            point_logits = teacher.forward_3d(b["coord"], b["feat"])["logits"][b["inverse"]]
            labels = labels_at_links(b, point_logits, teacher.forward_2d(b["images"])["logits"])
            for name in conf:  # GT rows of IGNORE_LABEL are skipped by confusion_matrix
                conf[name] += M.confusion_matrix(labels[name], labels["gt"], num_classes)
    return conf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a training run directory (its config, and its last checkpoint by default)")
    parser.add_argument("--checkpoint", default=None, help="a state.pt of this run or its folder (e.g. the end of stage cmg)")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg, ckpt, state = load_run_checkpoint(args.run, args.checkpoint)
    cfg = cfg_replace(cfg, **{"data.loader": "local"})
    class_names = tuple(shards.load_manifest(cfg.data.root)["class_names"])
    nc = len(class_names)
    teacher = TwoBranchModel(cfg.model, nc)
    teacher.load_state_dict(state["teacher"])
    conf = link_confusions(teacher, cfg, cfg.data.train_split, nc)
    present = (conf["3d"].sum(1) > 0).numpy()  # classes with GT links (the mIoU runs over these)
    iou = {k: np.nan_to_num(M.iou_per_class(c)) for k, c in conf.items()}
    miou = {k: float(v[present].mean()) for k, v in iou.items()}
    print(f"ORACLE diagnostic (reads GT): {args.run} at {ckpt.parent.name}, EMA teacher, "
          f"{int(conf['3d'].sum())} links of the train rooms, point-wise tag-masked argmax")
    print(f"{'class':<16}{'GT share':>9}{'3D':>7}{'2D':>7}{'fused':>7}")
    total = conf["3d"].sum()
    rows = []
    for c, name in enumerate(class_names):
        if not present[c]:
            continue
        row = {"class": name, "gt_share": float(conf["3d"][c].sum() / total),
               **{k: float(iou[k][c]) for k in iou}}
        rows.append(row)
        print(f"{name:<16}{row['gt_share']:>9.1%}" + "".join(f"{100 * row[k]:>7.1f}" for k in ("3d", "2d", "fused")))
    print(f"{'mIoU':<16}{'':>9}" + "".join(f"{100 * miou[k]:>7.1f}" for k in ("3d", "2d", "fused")))
    if args.out:
        Path(args.out).write_text(json.dumps({"run": args.run, "checkpoint": str(ckpt), "miou": miou,
                                              "classes": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
