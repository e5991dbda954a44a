"""A STAND-IN for ImageNet weights: 2D pretraining on object crops of synthetic rooms.

The paper's 2D branch starts from ImageNet weights (Table 7: 48.2 with them, 40.0 without).
Offline there are none, so this builds their analogue for the synthetic world: an image
*classification* corpus (one class label per crop, not per-pixel labels), like ImageNet, rendered
from synthetic rooms of their own seed (`pretrain_2d.seed`), so no benchmark or demo room, view
or label enters it (a synthetic room is a function of (seed, index) alone), then a plain
torchvision ResNet trained on it on the CPU. The result is a torchvision state dict that
`model.init_2d = <path>` loads like any local checkpoint (its `fc` head is ignored there).

It is a stand-in, labelled so everywhere: the file's sidecar JSON says `"stand_in": true`, and
nothing here says anything about ImageNet-pretrained weights on real images.

Crops: every view of every corpus room is split into the connected pixel components of each
class; a component of at least `min_pixels` pixels gives one square crop around its bounding box
(with a margin, so the object's surroundings are in view, as in ImageNet photos), resized to
`crop_size`; a component wider than half the view (walls, floors) gives a half-size window
centred on one of its pixels instead. At most `max_crops_per_class` crops of a class per room keep walls and floors from
swamping the corpus.

`pretrain_2d(cfg, out)` is cached: a file whose sidecar records the same settings is reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from rayseg import atomic
from rayseg.config import Config, Pretrain2DConfig, SyntheticConfig
from rayseg.data.pipeline import normalize_images
from rayseg.data.synthetic import IGNORE_LABEL, class_names, generate_scene
from rayseg.models._torchvision import import_torchvision

__all__ = ["render_crops", "render_views", "train_classifier", "train_segmenter", "pretrain_2d", "default_path",
           "settings_digest"]


def corpus_config(cfg: Pretrain2DConfig, profile: str) -> SyntheticConfig:
    """The synthetic rooms of the corpus: their own seed, every room used (no val split)."""
    return SyntheticConfig(profile=profile, num_scenes=cfg.rooms, val_fraction=0.0, num_views=cfg.views_per_room,
                           image_width=cfg.image_width, image_height=cfg.image_height, seed=cfg.seed,
                           min_points=2000, max_points=4000, points_per_m2=20.0)


def _square_box(rows: slice, cols: slice, margin: float, height: int, width: int) -> tuple[int, int, int, int]:
    """A square box (top, left, bottom, right) around a component's bounding box, widened by
    `margin` of its side, shifted (not cut) to stay inside the image where the image allows."""
    cy, cx = (rows.start + rows.stop) / 2, (cols.start + cols.stop) / 2
    side = int(round(max(rows.stop - rows.start, cols.stop - cols.start) * (1 + 2 * margin)))
    side = max(8, min(side, height, width))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    return top, left, top + side, left + side


def render_crops(cfg: Pretrain2DConfig, profile: str = "scannet20") -> tuple[np.ndarray, np.ndarray]:
    """The corpus: uint8 crops (K, s, s, 3) and their class ids (K,) int64."""
    syn = corpus_config(cfg, profile)
    crops, labels = [], []
    for index in range(cfg.rooms):
        scene = generate_scene(syn, index)
        rng = np.random.default_rng([cfg.seed, index, 1])
        for c in range(len(class_names(profile))):
            boxes = []
            for v in range(scene["view_label"].shape[0]):
                components, _ = ndimage.label(scene["view_label"][v] == c)
                for k, where in enumerate(ndimage.find_objects(components), start=1):
                    if where is not None and int((components[where] == k).sum()) >= cfg.min_pixels:
                        boxes.append((v, where))
            height, width = scene["view_label"].shape[1:]
            for i in rng.permutation(len(boxes))[:cfg.max_crops_per_class]:
                v, (rows, cols) = boxes[i]
                if max(rows.stop - rows.start, cols.stop - cols.start) > min(height, width) // 2:
                    # a wall or floor spanning the view: a half-size window centred on one of its pixels
                    ys, xs = np.nonzero(scene["view_label"][v] == c)
                    j = rng.integers(len(ys))
                    half = min(height, width) // 4
                    rows, cols = slice(ys[j] - half, ys[j] + half), slice(xs[j] - half, xs[j] + half)
                    top, left, bottom, right = _square_box(rows, cols, 0.0, height, width)
                else:
                    top, left, bottom, right = _square_box(rows, cols, cfg.margin, height, width)
                crop = Image.fromarray(scene["view_rgb"][v, top:bottom, left:right])
                crops.append(np.asarray(crop.resize((cfg.crop_size, cfg.crop_size), Image.BILINEAR)))
                labels.append(c)
    if not crops:
        raise ValueError(f"pretrain_2d: {cfg.rooms} rooms gave no crop of >= {cfg.min_pixels} pixels")
    return np.stack(crops), np.asarray(labels, np.int64)


def _seeded_split(n: int, seed: int) -> tuple[torch.Generator, np.ndarray, np.ndarray]:
    """Seeds torch, then (generator for the batches and augmentation, held-out 10 %, the rest)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).numpy()
    held = max(1, n // 10)
    return generator, order[:held], order[held:]


def _cosine_lr(opt: torch.optim.Optimizer, cfg: Pretrain2DConfig, step: int) -> None:
    for group in opt.param_groups:  # cosine decay to 0
        group["lr"] = cfg.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))


def render_views(cfg: Pretrain2DConfig, profile: str = "scannet20") -> tuple[np.ndarray, np.ndarray]:
    """The 'pixels' corpus: every view of every corpus room, uint8 (N, H, W, 3), and its per-pixel
    class ids uint8 (N, H, W) (IGNORE_LABEL where no surface was hit)."""
    syn = corpus_config(cfg, profile)
    scenes = [generate_scene(syn, index) for index in range(cfg.rooms)]
    return (np.concatenate([s["view_rgb"] for s in scenes]), np.concatenate([s["view_label"] for s in scenes]))


def train_segmenter(images: np.ndarray, labels: np.ndarray, cfg: Pretrain2DConfig, num_classes: int,
                    log_every: int = 50) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the 2D branch's network (ResNet2D: dilated, output stride 8, 1x1 classifier) on the
    views' per-pixel labels; 10 % of the views are held out for pixel accuracy and mIoU. Returns
    (the backbone's state dict in torchvision names + classifier.weight, stats)."""
    from rayseg.metrics import confusion_matrix, mean_iou, overall_accuracy
    from rayseg.models.resnet2d import ResNet2D

    generator, test_idx, train_idx = _seeded_split(len(labels), cfg.seed)
    x = torch.from_numpy(normalize_images(images))
    y = torch.from_numpy(labels.astype(np.int64))
    net = ResNet2D(cfg.backbone, num_classes, init="none")
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    net.train()
    t0 = time.time()
    for step in range(cfg.steps):
        _cosine_lr(opt, cfg, step)
        batch = torch.from_numpy(train_idx[torch.randint(len(train_idx), (cfg.batch_size,), generator=generator).numpy()])
        flip = torch.rand(len(batch), generator=generator) < 0.5  # the same flip for a view and its labels
        images_b = torch.where(flip[:, None, None, None], x[batch].flip(-1), x[batch])
        labels_b = torch.where(flip[:, None, None], y[batch].flip(-1), y[batch])
        _, logits = net(_augment(images_b, generator, flips=False))
        loss = F.cross_entropy(logits, labels_b, ignore_index=IGNORE_LABEL)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"[rayseg] pretrain-2d (pixels) step {step + 1}/{cfg.steps} loss={float(loss.detach()):.3f} "
                  f"{(step + 1) * cfg.batch_size / (time.time() - t0):.1f} views/s", flush=True)
    net.eval()
    conf = torch.zeros((num_classes, num_classes), dtype=torch.int64)
    with torch.no_grad():
        for i in range(0, len(test_idx), 32):
            rows = torch.from_numpy(test_idx[i:i + 32])
            conf += confusion_matrix(net(x[rows])[1].argmax(1), y[rows], num_classes)
    # the backbone in torchvision names (conv1, bn1, layer1, ...) and the per-pixel classifier, which
    # only model.init_2d_classifier loads (a backbone init ignores classifier.* keys)
    state = {**net.backbone.state_dict(), "classifier.weight": net.classifier.weight.detach().clone()}
    return state, {"held_out_pixel_accuracy": overall_accuracy(conf), "held_out_miou": mean_iou(conf),
                   "views": int(len(labels)), "held_out": int(len(test_idx)), "seconds": time.time() - t0}


def _classifier(backbone: str, num_classes: int) -> torch.nn.Module:
    tv = import_torchvision()
    return getattr(tv.models, backbone)(weights=None, num_classes=num_classes)


def _augment(images: torch.Tensor, generator: torch.Generator, flips: bool = True) -> torch.Tensor:
    """Random horizontal flips (unless the caller flips) and brightness / contrast jitter of a
    normalised batch."""
    if flips:
        flip = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    gain = 1 + 0.4 * (torch.rand(len(images), 1, 1, 1, generator=generator) - 0.5)
    shift = 0.4 * (torch.rand(len(images), 1, 1, 1, generator=generator) - 0.5)
    return images * gain + shift


def train_classifier(images: np.ndarray, labels: np.ndarray, cfg: Pretrain2DConfig, num_classes: int,
                     log_every: int = 100) -> tuple[dict[str, torch.Tensor], dict]:
    """Train a plain (undilated) torchvision ResNet to classify the crops; 10 % of them are held
    out for the accuracy. Returns (state dict, {"held_out_accuracy", "train_accuracy", ...})."""
    generator, test_idx, train_idx = _seeded_split(len(labels), cfg.seed)
    x = torch.from_numpy(normalize_images(images))
    y = torch.from_numpy(labels)
    net = _classifier(cfg.backbone, num_classes)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    net.train()
    t0, correct, seen = time.time(), 0, 0
    for step in range(cfg.steps):
        _cosine_lr(opt, cfg, step)
        batch = torch.from_numpy(train_idx[torch.randint(len(train_idx), (cfg.batch_size,), generator=generator).numpy()])
        logits = net(_augment(x[batch], generator))
        loss = F.cross_entropy(logits, y[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        correct += int((logits.argmax(1) == y[batch]).sum())
        seen += len(batch)
        if log_every and (step + 1) % log_every == 0:
            print(f"[rayseg] pretrain-2d step {step + 1}/{cfg.steps} loss={float(loss.detach()):.3f} "
                  f"train acc={correct / seen:.3f} {seen / (time.time() - t0):.0f} images/s", flush=True)
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(x[torch.from_numpy(test_idx[i:i + 256])]).argmax(1)
                          for i in range(0, len(test_idx), 256)])
    held_acc = float((pred == y[torch.from_numpy(test_idx)]).float().mean())
    counts = np.bincount(labels, minlength=num_classes)
    return net.state_dict(), {"held_out_accuracy": held_acc, "train_accuracy_running": correct / max(seen, 1),
                              "crops": int(len(labels)), "held_out": int(len(test_idx)),
                              "majority_class_share": float(counts.max() / counts.sum()),
                              "seconds": time.time() - t0}


def settings(cfg: Pretrain2DConfig, profile: str) -> dict:
    """What the output depends on. task 'crops' is left out, so files cached before `task`
    existed keep their names and stay valid."""
    out = {"profile": profile, **asdict(cfg)}
    if out["task"] == "crops":
        del out["task"]
    return out


def settings_digest(cfg: Pretrain2DConfig, profile: str) -> str:
    return hashlib.sha256(json.dumps(settings(cfg, profile), sort_keys=True).encode()).hexdigest()[:12]


def default_path(cfg: Pretrain2DConfig, profile: str) -> Path:
    """Where the stand-in is cached per machine: one file per settings."""
    task = "" if cfg.task == "crops" else f"{cfg.task}-"
    return Path(cfg.cache_dir).expanduser() / f"standin-{task}{profile}-{cfg.backbone}-{settings_digest(cfg, profile)}.pth"


def pretrain_2d(config: Config, out: str | Path | None = None, force: bool = False) -> Path:
    """Render the corpus, train, and save the backbone (torchvision names) atomically at `out`
    (default: the cache path), with a sidecar `<out>.json`. Reused when the sidecar records the
    same settings, unless `force`."""
    cfg, profile = config.pretrain_2d, config.synthetic.profile
    path = Path(out) if out else default_path(cfg, profile)
    sidecar = path.with_name(path.name + ".json")
    wanted = settings(cfg, profile)
    if not force and path.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()).get("settings") == wanted:
                print(f"[rayseg] pretrain-2d: {path} is up to date (stand-in, cached)", flush=True)
                return path
        except json.JSONDecodeError:
            pass
    t0 = time.time()
    names = class_names(profile)
    if cfg.task == "pixels":
        images, labels = render_views(cfg, profile)
        print(f"[rayseg] pretrain-2d: {len(labels)} views of {cfg.rooms} rooms (seed {cfg.seed}) in "
              f"{time.time() - t0:.0f} s; training the dilated {cfg.backbone} on their per-pixel labels for "
              f"{cfg.steps} steps", flush=True)
        state, stats = train_segmenter(images, labels, cfg, len(names))
        what = ("2D pretraining STAND-IN (per-pixel labels): the 2D branch's network trained to segment views "
                "of synthetic rooms of their own seed (no benchmark or demo room); more 2D knowledge than an "
                "ImageNet backbone gives, the analogue of a segmentation-pretrained one")
        counts = np.bincount(labels[labels != IGNORE_LABEL], minlength=len(names))
        summary = (f"held-out pixel accuracy {stats['held_out_pixel_accuracy']:.3f}, "
                   f"mIoU {stats['held_out_miou']:.3f}")
    else:
        images, labels = render_crops(cfg, profile)
        print(f"[rayseg] pretrain-2d: {len(labels)} crops of {cfg.rooms} rooms (seed {cfg.seed}) in "
              f"{time.time() - t0:.0f} s; training {cfg.backbone} for {cfg.steps} steps", flush=True)
        state, stats = train_classifier(images, labels, cfg, len(names))
        what = ("2D pretraining STAND-IN for ImageNet weights: object crops of synthetic rooms of their own "
                "seed (no benchmark or demo room), one class label per crop")
        counts = np.bincount(labels, minlength=len(names))
        summary = (f"held-out crop accuracy {stats['held_out_accuracy']:.3f} "
                   f"(majority class {stats['majority_class_share']:.3f})")
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)
    info = {"stand_in": True, "what": what, "settings": wanted, "class_names": list(names), "stats": stats,
            "class_counts": counts.tolist()}
    atomic.write_bytes(sidecar, json.dumps(info, indent=2).encode())
    print(f"[rayseg] pretrain-2d: {summary}; saved {path}", flush=True)
    return path
