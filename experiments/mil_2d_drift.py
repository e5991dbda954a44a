"""ORACLE diagnostic: does the 2D branch's tag loss keep a segmentation the branch already knows?

    .venv/bin/python experiments/mil_2d_drift.py STANDIN.pth DATA_ROOT [--steps 150] [--out FILE]

Starts the 2D branch (ResNet2D, backbone and 1x1 classifier) from a per-pixel stand-in
(`rayseg pretrain-2d --set pretrain_2d.task=pixels`, whose classifier.weight
`model.init_2d_classifier` loads), then trains it with the method's 2D classification loss alone
(losses.multilabel_cls_loss_2d: logits average-pooled over all pixels of a scene's views, scene
tags as multi-label targets), as stage cmg does: 4 scenes a step, 2 of their rendered views,
SGD lr 0.1 with the backbone at x0.1, momentum 0.9. Every `--every` steps it reads, against the
**ground truth**, the tag-masked per-pixel argmax on all views of all train rooms: whether the
loss's optimum keeps a correct segmentation. Nothing from it feeds training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from rayseg import losses as L
from rayseg import metrics as M
from rayseg.data import shards
from rayseg.data.pipeline import normalize_images
from rayseg.models.resnet2d import ResNet2D


def masked_miou(net: ResNet2D, rooms: list[dict]) -> tuple[float, np.ndarray]:
    classes = net.classifier.out_channels
    conf = torch.zeros(classes, classes, dtype=torch.int64)
    net.eval()
    with torch.no_grad():
        for room in rooms:
            logits = net(room["x"])[1]
            logits[:, ~room["tags"].bool()] = -1e9
            conf += M.confusion_matrix(logits.argmax(1), room["y"], classes)
    net.train()
    return M.mean_iou(conf), M.iou_per_class(conf)


def standin_backbone(standin: str) -> str:
    """The ResNet a stand-in file holds, from its sidecar `<file>.json` (pretrain2d writes it)."""
    sidecar = Path(standin + ".json")
    try:
        return json.loads(sidecar.read_text())["settings"]["backbone"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"{sidecar}: cannot read the stand-in's settings.backbone ({exc}); "
                         "give a file `rayseg pretrain-2d` wrote") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("standin")
    parser.add_argument("data_root")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    names = shards.load_manifest(args.data_root)["class_names"]
    rooms = []
    for path in shards.scene_paths(args.data_root, "train"):
        s = shards.read_scene(path, ["view_rgb", "view_label", "tags"])
        rooms.append({"x": torch.from_numpy(normalize_images(s["view_rgb"])),
                      "y": torch.from_numpy(s["view_label"].astype(np.int64)),
                      "tags": torch.from_numpy(s["tags"].astype(np.float32))})
    torch.manual_seed(0)
    net = ResNet2D(standin_backbone(args.standin), len(names), init=args.standin, init_classifier=True)
    opt = torch.optim.SGD([{"params": net.backbone.parameters(), "lr": args.lr * 0.1},
                           {"params": net.classifier.parameters(), "lr": args.lr}], momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    curve = []
    for step in range(args.steps + 1):
        if step % args.every == 0:
            miou, iou = masked_miou(net, rooms)
            curve.append({"step": step, "miou": round(100 * miou, 1),
                          "iou": {n: round(100 * float(v), 1) for n, v in zip(names, iou) if not np.isnan(v)}})
            print(f"step {step:4d}: tag-masked per-pixel mIoU {100 * miou:5.1f}  " + " ".join(
                f"{n[:6]} {100 * float(v):4.1f}" for n, v in zip(names, iou) if n in ("table", "chair", "bed", "sofa", "cabinet", "desk")), flush=True)
        if step == args.steps:
            break
        batch = [rooms[i] for i in rng.choice(len(rooms), 4, replace=False)]
        views = [torch.from_numpy(rng.choice(room["x"].shape[0], 2, replace=False)) for room in batch]
        images = torch.cat([room["x"][v] for room, v in zip(batch, views)])
        offset = torch.tensor([2, 4, 6, 8])
        loss = L.multilabel_cls_loss_2d(net(images)[1], offset, torch.stack([r["tags"] for r in batch]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"standin": args.standin, "steps": args.steps, "lr": args.lr, "curve": curve}, f, indent=1)


if __name__ == "__main__":
    main()
