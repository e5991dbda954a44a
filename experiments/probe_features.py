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

`--tag-head` adds the weakly supervised counterpart, which reads **no** GT to fit: fresh linear
heads on the frozen, standardised 3D features fitted with the method's own signal only (Lcls3D:
scene tags against mean-pooled logits, over each train scene and its floor-removed and
wall-removed variants, as the removal augmentation makes them) for each of `--tag-head-steps`
(their final tag loss is printed) and on the first N train rooms for each of `--tag-head-rooms`,
scored point-wise (tag-masked argmax, no regions) on all points of the train split beside the
run's own head scored the same way. It asks: with these features, would a classifier fitted
harder, or on more rooms, give better pseudo-labels? `--data-root` extracts the features on
another prepared folder (e.g. more rooms of another generator seed).

The GT probes read GT labels to fit: it measures what the features *could* tell apart, it is
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


@torch.no_grad()
def extract_scenes(model: TwoBranchModel, cfg: cfgmod.Config, split: str) -> list[dict]:
    """Per scene: voxel features, the run's own voxel logits, voxel region / grid coordinates (of
    each voxel's first point), point -> voxel map, GT point labels (metric only) and tags."""
    from rayseg import losses as L

    model.eval()
    scenes = []
    for batch in iter_rank_batches(cfg, split, "eval", 0, 0, 1, 1):
        b = to_device(batch, torch.device("cpu"))
        out3 = model.forward_3d(b["coord"], b["feat"])
        first = L.voxel_representatives(b["inverse"], out3["feat"].shape[0])
        scenes.append({"feat": out3["feat"], "logits": out3["logits"], "inverse": b["inverse"].long(),
                       "region": b["region"][first].numpy(), "grid": b["coord"][:, 1:].float().numpy(),
                       "label": b["label"].long().numpy(), "tags": b["tags"][0].numpy() > 0.5})
    return scenes


def removal_variants(scene: dict, class_names: tuple[str, ...], voxel_size: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """(voxel keep mask, tags) of the scene whole and with its floor / walls / ceiling removed one
    at a time (probability 1), the way the training augmentation removes them (region partition,
    0.5 m bands; no GT)."""
    from types import SimpleNamespace

    from rayseg.data import transforms as T

    whole = np.ones(len(scene["region"]), bool)
    out = [(whole, scene["tags"])]
    base = {"coord": scene["grid"] * voxel_size, "region": scene["region"], "tags": scene["tags"].astype(np.float32)}
    for name in ("floor", "wall", "ceiling"):
        if name not in class_names:
            continue
        p = {f"remove_{n}_p": float(n == name) for n in ("floor", "wall", "ceiling")}
        keep, tags = T.structures_to_remove(base, "region", class_names, np.random.default_rng(0),
                                            SimpleNamespace(removal_band=0.5, **p))
        if keep is not None and keep.any():
            out.append((keep, tags > 0.5))
    return out


def fit_tag_head(scenes: list[dict], class_names: tuple[str, ...], voxel_size: float, steps: int = 300,
                 seed: int = 0):
    """A fresh linear head on frozen, standardised voxel features, trained on scene tags only
    (Lcls3D, full batch, Adam). Returns (head: features -> logits, final loss)."""
    torch.manual_seed(seed)
    every = torch.cat([s["feat"] for s in scenes])
    mean, std = every.mean(0), every.std(0).clamp_min(1e-6)
    items = [((s["feat"][torch.from_numpy(keep)] - mean) / std, torch.from_numpy(tags).float())
             for s in scenes for keep, tags in removal_variants(s, class_names, voxel_size)]
    lin = torch.nn.Linear(scenes[0]["feat"].shape[1], len(class_names))
    opt = torch.optim.Adam(lin.parameters(), lr=0.01)
    target = torch.stack([t for _, t in items])
    for _ in range(steps):
        opt.zero_grad()
        pooled = torch.stack([lin(f).mean(0) for f, _ in items])
        loss = F.multilabel_soft_margin_loss(pooled, target)
        loss.backward()
        opt.step()
    return (lambda f: lin((f - mean) / std)), float(loss.detach())


@torch.no_grad()
def pointwise_miou(scenes: list[dict], voxel_logits, num_classes: int) -> tuple[float, np.ndarray]:
    """Tag-masked argmax per point (no regions) against GT, over all points of the scenes."""
    logits, tags, labels = [], [], []
    for s in scenes:
        lg = voxel_logits(s)[s["inverse"]]
        keep = s["label"] != IGNORE
        logits.append(lg[torch.from_numpy(keep)])
        tags.append(np.repeat(s["tags"][None], int(keep.sum()), axis=0))
        labels.append(s["label"][keep])
    return masked_miou(torch.cat(logits), np.concatenate(tags), np.concatenate(labels), num_classes)


def tag_head_rows(name: str, model: TwoBranchModel, cfg: cfgmod.Config, class_names: tuple[str, ...],
                  steps: tuple[int, ...] = (300, 1500), rooms: tuple[int, ...] = (0,)) -> list[dict]:
    """The run's own head and fresh tags-only heads fitted for each number of steps (the longest
    shows whether the shorter had converged) on the first N train rooms for each N in `rooms`
    (0 = all), all scored point-wise on all the train rooms."""
    scenes = extract_scenes(model, cfg, cfg.data.train_split)
    nc = len(class_names)
    heads = [("own head", lambda s: s["logits"], None)]
    for n_rooms in rooms:
        fit_on = scenes[:n_rooms] if n_rooms else scenes
        for n in steps:
            head, loss = fit_tag_head(fit_on, class_names, cfg.data.voxel_size, steps=n)
            heads.append((f"tags-only head, {len(fit_on)} rooms, {n} steps",
                          (lambda h: lambda s: h(s["feat"]))(head), loss))
    rows = []
    for what, fn, loss in heads:
        miou, per_class = pointwise_miou(scenes, fn, nc)
        rows.append({"model": name, "features": f"3D, {what}", "train_miou_pointwise": round(miou, 1),
                     "tag_loss": None if loss is None else round(loss, 4),
                     "per_class": [None if np.isnan(v) else round(float(v), 1) for v in per_class]})
        print(f"{name:40s} 3D {what:38s} train point-wise mIoU ({len(scenes)} rooms) {miou:5.1f} (no GT fitted)"
              + ("" if loss is None else f", final tag loss {loss:.4f}"), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="training run directories (their last checkpoint's teacher)")
    parser.add_argument("--init-2d", default=None, help="also probe this 2D initialisation alone (untrained on the rooms)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--tag-head", action="store_true",
                        help="also fit a tags-only head on the frozen 3D features (no GT) and compare its pseudo-labels")
    parser.add_argument("--no-gt-probe", action="store_true", help="skip the GT probes")
    parser.add_argument("--data-root", default=None,
                        help="extract features on this prepared folder instead of the run's data.root "
                             "(e.g. more rooms of another seed, to see how the tags-only head scales)")
    parser.add_argument("--tag-head-steps", default="300,1500", help="comma-separated step counts of the tags-only heads")
    parser.add_argument("--tag-head-rooms", default="0",
                        help="comma-separated numbers of train rooms to fit tags-only heads on (0 = all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict] = []
    for i, run in enumerate(args.runs):
        cfg = cfgmod.replace(load_run(run), **{"data.loader": "local"})
        if args.data_root:
            cfg = cfgmod.replace(cfg, **{"data.root": args.data_root})
        class_names = tuple(shards.load_manifest(cfg.data.root)["class_names"])
        nc = len(class_names)
        ckpt = latest_checkpoint(Path(run))
        if ckpt is None:
            sys.exit(f"{run}: no checkpoint")
        model = TwoBranchModel(cfg.model, nc)
        model.load_state_dict(load_state(ckpt)["teacher"])
        name = f"{Path(run).name} ({ckpt.parent.name})"
        if args.tag_head:
            rows += tag_head_rows(name, model, cfg, class_names,
                                  tuple(int(n) for n in args.tag_head_steps.split(",")),
                                  tuple(int(n) for n in args.tag_head_rooms.split(",")))
        if args.no_gt_probe:
            continue
        train = extract(model, cfg, cfg.data.train_split, nc)
        val = extract(model, cfg, cfg.data.val_split, nc)
        keys = ("inp", "f3", "f2") if i == 0 else ("f3", "f2")
        rows += probe_rows(name, train, val, nc, keys)
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
