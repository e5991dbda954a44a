"""ORACLE diagnostic: how much class knowledge sits in each branch's features? (GT-trained linear probes)

    .venv/bin/python experiments/probe_features.py RUN_DIR [RUN_DIR ...] [--init-2d PATH] [--out FILE]

For each training run (its last checkpoint's EMA teacher) this extracts, on every scene of the
train and val splits (un-augmented, "eval" mode):
  - 3D: the teacher's point features F3D (the decoder output the 3D cls head reads);
  - 2D: the teacher's stride-8 features F2D sampled at the pixels linked to points, exactly as
    cross-modal guidance samples them;
and fits a linear softmax classifier on the train split's **ground truth** (class-balanced), then
reports its mIoU on the val split, with each scene's tags masking absent classes (as pseudo-labels
do). Rows for the raw input (colour + normal) and for a 2D initialisation alone (`--init-2d`, e.g.
the `rayseg pretrain-2d` stand-in, before any training on the rooms) give the floor and the 2D
prior. Both 3D and 2D probes are scored on the same linked points, so the columns compare.

This reads GT labels to fit the probes: it measures what the features *could* tell apart, it is
not a method result and nothing from it feeds training. Everything is on whatever data the runs
trained on (in this repository: synthetic rooms).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rayseg import config as cfgmod
from rayseg.data import shards
from rayseg.models.twobranch import TwoBranchModel
from rayseg.train.checkpoint import latest_checkpoint, load_state
from rayseg.train.device import to_device
from rayseg.train.launch import load_run
from rayseg.train.loop import iter_rank_batches

IGNORE = 255


@torch.no_grad()
def extract(model: TwoBranchModel, cfg: cfgmod.Config, split: str, num_classes: int) -> dict[str, np.ndarray]:
    """Per linked point of every scene: 3D feature, 2D feature, input feature, GT label, scene tags."""
    model.eval()
    out = {"f3": [], "f2": [], "inp": [], "label": [], "tags": []}
    for batch in iter_rank_batches(cfg, split, "eval", 0, 0, 1, 1):
        b = to_device(batch, torch.device("cpu"))
        if not len(b["link_point"]):
            continue
        f3 = model.forward_3d(b["coord"], b["feat"])["feat"][b["inverse"]]
        f2map = model.forward_2d(b["images"])["feat"]
        # one link per point (its first view), so every linked point counts once
        lp = b["link_point"]
        order = np.argsort(lp.numpy(), kind="stable")
        _, first = np.unique(lp.numpy()[order], return_index=True)
        pick = torch.from_numpy(order[first])
        lp, lv, lpx = lp[pick], b["link_view"][pick], b["link_pixel"][pick]
        f2 = model.sample_2d(f2map, lv, lpx, tuple(b["images"].shape[-2:]))
        label = b["label"][lp].long()
        keep = label != IGNORE
        out["f3"].append(f3[lp][keep].numpy())
        out["f2"].append(f2[keep].numpy())
        out["inp"].append(b["feat"][b["inverse"]][lp][keep].numpy())
        out["label"].append(label[keep].numpy())
        out["tags"].append(np.repeat(b["tags"][0].numpy()[None] > 0.5, int(keep.sum()), axis=0))
    return {k: np.concatenate(v) for k, v in out.items()}


def fit_probe(x: np.ndarray, y: np.ndarray, num_classes: int, steps: int = 400, seed: int = 0):
    """Class-balanced multinomial logistic regression on standardised features (full batch, Adam)."""
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x).float()
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    xt = (xt - mean) / std
    yt = torch.from_numpy(y).long()
    counts = torch.bincount(yt, minlength=num_classes).float()
    weight = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), torch.zeros(()))
    lin = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.normal_(lin.weight, std=0.01, generator=gen)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(xt), yt, weight=weight).backward()
        opt.step()
    return lambda z: lin((torch.from_numpy(z).float() - mean) / std)


def masked_miou(logits: torch.Tensor, tags: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[float, np.ndarray]:
    """mIoU over classes present in y, with classes absent from each point's scene tags masked out."""
    pred = logits.masked_fill(~torch.from_numpy(tags), -1e9).argmax(1).numpy()
    conf = np.bincount(y * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - inter
    present = conf.sum(1) > 0
    iou = np.where(present, inter / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou) * 100), iou * 100


def probe_rows(name: str, train: dict, val: dict, num_classes: int, keys: tuple[str, ...]) -> list[dict]:
    rows = []
    for key in keys:
        predict = fit_probe(train[key], train["label"], num_classes)
        miou, per_class = masked_miou(predict(val[key]), val["tags"], val["label"], num_classes)
        rows.append({"model": name, "features": {"f3": "3D", "f2": "2D", "inp": "input"}[key],
                     "val_miou": round(miou, 1), "per_class": [None if np.isnan(v) else round(float(v), 1)
                                                               for v in per_class]})
        print(f"{name:40s} {rows[-1]['features']:6s} probe val mIoU {miou:5.1f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="training run directories (their last checkpoint's teacher)")
    parser.add_argument("--init-2d", default=None, help="also probe this 2D initialisation alone (untrained on the rooms)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict] = []
    for i, run in enumerate(args.runs):
        cfg = cfgmod.replace(load_run(run), **{"data.loader": "local"})
        class_names = tuple(shards.load_manifest(cfg.data.root)["class_names"])
        nc = len(class_names)
        ckpt = latest_checkpoint(Path(run))
        if ckpt is None:
            sys.exit(f"{run}: no checkpoint")
        model = TwoBranchModel(cfg.model, nc)
        model.load_state_dict(load_state(ckpt)["teacher"])
        train = extract(model, cfg, cfg.data.train_split, nc)
        val = extract(model, cfg, cfg.data.val_split, nc)
        keys = ("inp", "f3", "f2") if i == 0 else ("f3", "f2")
        rows += probe_rows(f"{Path(run).name} ({ckpt.parent.name})", train, val, nc, keys)
        if i == 0 and args.init_2d:
            init_cfg = cfgmod.replace(cfg, **{"model.init_2d": args.init_2d})
            init_model = TwoBranchModel(init_cfg.model, nc)
            train = extract(init_model, init_cfg, cfg.data.train_split, nc)
            val = extract(init_model, init_cfg, cfg.data.val_split, nc)
            rows += probe_rows(f"2D init {Path(args.init_2d).name} (untrained on rooms)", train, val, nc, ("f2",))
    if args.out:
        Path(args.out).write_text(json.dumps({"class_names": list(class_names), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
