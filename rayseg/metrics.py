"""Segmentation metrics from a confusion matrix of int64 counts (3D points or 2D pixels alike).

The matrix is ``conf[gt, pred]``: rows are ground-truth classes, columns predictions. Counts are
accumulated per batch (``conf += confusion_matrix(...)``), summed over DDP ranks with
``all_reduce_sum`` and divided only at the end:

- IoU[c] = TP / (TP + FP + FN), NaN where the union TP + FP + FN is 0 (class never seen nor
  predicted);
- mIoU = mean of IoU over the classes with union > 0 (absent-and-never-predicted classes are
  left out instead of counting as 0 or 1);
- overall accuracy = trace / total.

Points labelled IGNORE_LABEL (255) are skipped. Plots and CSV files are written atomically.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from rayseg import atomic
from rayseg.data.scene import IGNORE_LABEL


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over all ranks when torch.distributed is initialised (no-op
    otherwise) and return it. Used for confusion matrices and RPC threshold counts. The tensor
    must live where the backend works: any device for gloo, CUDA for NCCL."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def confusion_matrix(pred, target, num_classes: int, ignore_label: int = IGNORE_LABEL) -> torch.Tensor:
    """Counts (C, C) int64, conf[gt, pred], of one batch. pred and target: same-shape integer
    arrays or tensors (any shape; flattened). Targets equal to ignore_label are skipped; any other
    target or prediction outside 0..C-1 raises."""
    pred = torch.as_tensor(pred).reshape(-1).long()
    target = torch.as_tensor(target).reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.numel()} entries but target has {target.numel()}")
    valid = target != ignore_label
    pred, target = pred[valid], target[valid]
    if len(target) and (target.min() < 0 or target.max() >= num_classes):
        bad = target[(target < 0) | (target >= num_classes)][0].item()
        raise ValueError(f"target holds label {bad}, outside 0..{num_classes - 1} and not ignore {ignore_label}")
    if len(pred) and (pred.min() < 0 or pred.max() >= num_classes):
        bad = pred[(pred < 0) | (pred >= num_classes)][0].item()
        raise ValueError(f"prediction holds class {bad}, outside 0..{num_classes - 1}")
    flat = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).to(torch.int64)


def iou_per_class(conf) -> np.ndarray:
    """IoU (C,) float64; NaN where the class has union 0."""
    conf = torch.as_tensor(conf).to(torch.float64).cpu().numpy()
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(conf) -> float:
    """Mean IoU over classes with union > 0 (NaN if there is none)."""
    iou = iou_per_class(conf)
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else float("nan")


def overall_accuracy(conf) -> float:
    """Correct / counted (NaN for an empty matrix)."""
    conf = torch.as_tensor(conf).to(torch.float64).cpu().numpy()
    total = conf.sum()
    return float(np.trace(conf) / total) if total > 0 else float("nan")


def _check_names(conf, class_names) -> np.ndarray:
    conf = torch.as_tensor(conf).cpu().numpy()
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] != len(class_names):
        raise ValueError(f"confusion matrix of shape {conf.shape} does not match {len(class_names)} class names")
    return conf


def metrics_dict(conf, class_names, prefix: str = "") -> dict[str, float]:
    """Flat floats for logging: <prefix>miou, <prefix>oa, <prefix>iou/<class name> (spaces in
    names become '_'; classes with union 0 are left out since their IoU is undefined)."""
    _check_names(conf, class_names)
    out = {f"{prefix}miou": mean_iou(conf), f"{prefix}oa": overall_accuracy(conf)}
    for name, value in zip(class_names, iou_per_class(conf)):
        if not np.isnan(value):
            out[f"{prefix}iou/{name.replace(' ', '_')}"] = float(value)
    return out


def iou_table(conf, class_names, title: str = "") -> str:
    """Human-readable per-class IoU table (percent) with class names, ending with mIoU and OA."""
    conf = _check_names(conf, class_names)
    iou = iou_per_class(conf)
    gt_counts = conf.sum(1)
    width = max(12, max(len(n) for n in class_names))
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  {'IoU %':>7}  {'GT count':>12}")
    lines.append("-" * (width + 23))
    for name, value, count in zip(class_names, iou, gt_counts):
        shown = "    n/a" if np.isnan(value) else f"{100 * value:7.2f}"
        lines.append(f"{name:<{width}}  {shown}  {int(count):>12d}")
    lines.append("-" * (width + 23))
    lines.append(f"{'mIoU':<{width}}  {100 * mean_iou(conf):7.2f}")
    lines.append(f"{'overall acc':<{width}}  {100 * overall_accuracy(conf):7.2f}")
    return "\n".join(lines)


def write_iou_csv(conf, class_names, path: str | Path) -> Path:
    """CSV with columns class, iou, tp, fp, fn, gt_count (iou empty where the union is 0)."""
    conf = _check_names(conf, class_names).astype(np.int64)
    iou = iou_per_class(conf)
    tp = np.diag(conf)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["class", "iou", "tp", "fp", "fn", "gt_count"])
    for c, name in enumerate(class_names):
        writer.writerow([name, "" if np.isnan(iou[c]) else f"{iou[c]:.6f}", int(tp[c]),
                         int(conf[:, c].sum() - tp[c]), int(conf[c].sum() - tp[c]), int(conf[c].sum())])
    return atomic.write_bytes(path, buf.getvalue().encode())


def _save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return atomic.write_bytes(path, buf.getvalue())


def plot_confusion(conf, class_names, path: str | Path, title: str = "confusion matrix") -> Path:
    """PNG of the row-normalised confusion matrix (each GT row sums to 1; empty rows stay 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = _check_names(conf, class_names).astype(np.float64)
    rows = conf.sum(1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(2 + 0.45 * n, 1.5 + 0.45 * n))
    im = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), class_names, rotation=90)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save_figure(fig, path)


def plot_iou_bars(conf, class_names, path: str | Path, title: str = "per-class IoU") -> Path:
    """PNG bar chart of per-class IoU (%) with the mIoU as a line; classes with union 0 are blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _check_names(conf, class_names)
    iou = np.nan_to_num(iou_per_class(conf), nan=0.0) * 100
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(2 + 0.4 * n, 4))
    ax.bar(range(n), iou, color="tab:blue")
    ax.axhline(100 * mean_iou(conf), color="tab:red", linestyle="--", label=f"mIoU {100 * mean_iou(conf):.1f}")
    ax.set_xticks(range(n), class_names, rotation=90)
    ax.set_ylim(0, 100)
    ax.set_ylabel("IoU %")
    ax.set_title(title)
    ax.legend()
    return _save_figure(fig, path)
