"""Partition quality: the oracle mIoU of labelling every region with its majority GT class.

EVALUATION ONLY: the one place where partitions meet ground truth. For each region, the
majority class of its points (ignoring IGNORE_LABEL points; ties to the lowest class id)
becomes the prediction of all its points; a NO_REGION point is its own region (that is how RPC
treats it), so it is predicted as its own class; the table therefore also reports the share of
such points. IoU per class is accumulated over all scenes as counts and divided at the end;
mIoU averages the classes that occur (union > 0).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from rayseg import config as cfgmod
from rayseg.data.scene import IGNORE_LABEL
from rayseg.partition.geometry import PartitionError


def oracle_prediction(region: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-point prediction (same shape as label, int64): the majority GT class of the point's
    region, the point's own label where it has no region (region < 0)."""
    region = np.asarray(region).reshape(-1).astype(np.int64)
    label = np.asarray(label).reshape(-1).astype(np.int64)
    if region.shape != label.shape:
        raise ValueError(f"region {region.shape} and label {label.shape} differ in size")
    pred = label.copy()
    known = (label != IGNORE_LABEL) & (label >= 0) & (label < num_classes)
    has = region >= 0
    if has.any():
        num = int(region.max()) + 1
        both = known & has
        counts = np.bincount(region[both] * num_classes + label[both],
                             minlength=num * num_classes).reshape(num, num_classes)
        pred[has] = counts.argmax(axis=1)[region[has]]
    return pred


def confusion(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts [gt, pred] over points whose label is a class (not IGNORE)."""
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    label = np.asarray(label).reshape(-1).astype(np.int64)
    known = (label != IGNORE_LABEL) & (label >= 0) & (label < num_classes)
    return np.bincount(label[known] * num_classes + pred[known],
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """(mIoU over classes with union > 0, per-class IoU with NaN where union == 0)."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    present = union > 0
    return (float(iou[present].mean()) if present.any() else float("nan")), iou


class QualityAccumulator:
    """Sums over scenes for one method: region counts, sizes, unassigned points, confusion."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.scenes = 0
        self.regions = 0
        self.points = 0
        self.unassigned = 0
        self.conf = np.zeros((num_classes, num_classes), np.int64)
        self.view_conf = np.zeros((num_classes, num_classes), np.int64)
        self.has_views = False

    def add(self, region: np.ndarray, label: np.ndarray, view_region: np.ndarray | None = None,
            view_label: np.ndarray | None = None) -> None:
        self.scenes += 1
        valid = region >= 0
        self.regions += int(np.count_nonzero(np.bincount(region[valid]))) if valid.any() else 0
        self.points += int(region.size)
        self.unassigned += int((~valid).sum())
        self.conf += confusion(oracle_prediction(region, label, self.num_classes), label, self.num_classes)
        if view_region is not None and view_label is not None and view_region.size:
            self.has_views = True
            for vr, vl in zip(view_region, view_label):  # regions are per view
                self.view_conf += confusion(oracle_prediction(vr, vl, self.num_classes), vl,
                                            self.num_classes)

    def class_iou(self) -> np.ndarray:
        """Per-class oracle IoU (C,), NaN for classes absent from GT and predictions: which
        classes the partition can carry at all (RPC's region pooling cannot label a class whose
        points share regions with another class's)."""
        return iou_from_confusion(self.conf)[1]

    def summary(self) -> dict[str, float]:
        assigned = self.points - self.unassigned
        out = {
            "scenes": float(self.scenes),
            "regions_per_scene": self.regions / max(self.scenes, 1),
            "mean_region_size": assigned / max(self.regions, 1),
            "unassigned_fraction": self.unassigned / max(self.points, 1),
            "oracle_miou": iou_from_confusion(self.conf)[0],
        }
        if self.has_views:
            out["oracle_miou_2d"] = iou_from_confusion(self.view_conf)[0]
        return out


def _read_columns(methods: list[str], have: set[str]) -> list[str]:
    cols = ["label"] + [f"region_{m}" for m in methods]
    if "view_label" in have:
        cols += ["view_label"] + [f"view_region_{m}" for m in methods if f"view_region_{m}" in have]
    return cols


def run_quality(root: str | Path, methods: list[str], cfg: cfgmod.Config, split: str | None = None,
                progress_seconds: float = 5.0) -> dict[str, dict[str, float]]:
    """Quality summary per method over a prepared, partitioned dataset (module doc).

    Logged to MLflow (one run, metrics ``<method>/<name>``, tag ``partition.oracle_methods``)
    when ``cfg.tracking.uri`` is set. Raises PartitionError naming the scenes that lack a
    requested method's column."""
    from rayseg.data import shards
    from rayseg.partition import check_method

    methods = list(dict.fromkeys(methods))
    for m in methods:
        check_method(m)
    root = Path(root)
    manifest = shards.load_manifest(root)
    num_classes = int(manifest["num_classes"])
    paths = shards.scene_paths(root, split)
    columns = {p: set(shards.shard_columns(p)) for p in paths}
    for m in methods:
        missing = [p.stem for p in paths if f"region_{m}" not in columns[p]]
        if missing:
            raise PartitionError(
                f"{root}: {len(missing)} scene(s) have no region_{m} column (e.g. "
                f"{', '.join(missing[:5])}): run `rayseg partition {root} --method {m}` first")
    unlabelled = [p.stem for p in paths if "label" not in columns[p]]
    if unlabelled:
        raise PartitionError(f"{root}: {len(unlabelled)} scene(s) have no ground-truth label column "
                             f"(e.g. {', '.join(unlabelled[:5])}): the oracle quality needs it")
    acc = {m: QualityAccumulator(num_classes) for m in methods}
    start = last = time.time()
    for i, path in enumerate(paths):
        scene = shards.read_scene(path, _read_columns(methods, columns[path]))
        for m in methods:
            acc[m].add(scene[f"region_{m}"], scene["label"], scene.get(f"view_region_{m}"),
                       scene.get("view_label"))
        if time.time() - last >= progress_seconds:
            print(f"partition-quality: {i + 1}/{len(paths)} scenes", flush=True)
            last = time.time()
    results = {m: acc[m].summary() for m in methods}
    class_names = list(manifest["class_names"])
    for m in methods:  # per class, as "<method>/oracle_iou/<class>" beside the summary numbers
        results[m].update({f"oracle_iou/{name}": float(v) for name, v in zip(class_names, acc[m].class_iou())})
    print(format_table(results), flush=True)
    print(format_class_table(results, class_names), flush=True)
    print(f"partition-quality: {len(paths)} scenes in {time.time() - start:.1f} s", flush=True)
    if cfg.tracking.uri:
        _log_mlflow(cfg, root, split, results, class_names)
    return results


def method_label(method: str) -> str:
    from rayseg.partition import is_oracle

    return f"{method} (ORACLE: GT instances)" if is_oracle(method) else method


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per method."""
    head = (f"{'method':<28} {'scenes':>6} {'regions/scene':>13} {'mean size':>10} "
            f"{'no region':>9} {'oracle mIoU 3D':>14} {'oracle mIoU 2D':>14}")
    lines = [head, "-" * len(head)]
    for m, r in results.items():
        miou_2d = f"{100 * r['oracle_miou_2d']:13.1f}%" if "oracle_miou_2d" in r else f"{'-':>14}"
        lines.append(f"{method_label(m):<28} {int(r['scenes']):6d} {r['regions_per_scene']:13.1f} "
                     f"{r['mean_region_size']:10.1f} {100 * r['unassigned_fraction']:8.1f}% "
                     f"{100 * r['oracle_miou']:13.1f}% {miou_2d}")
    return "\n".join(lines)


def format_class_table(results: dict[str, dict[str, float]], class_names: list[str]) -> str:
    """Per-class oracle IoU 3D (%), one column per method; classes absent from GT left out."""
    methods = list(results)
    head = f"{'oracle IoU 3D per class':<24}" + "".join(f"{m[:16]:>17}" for m in methods)
    lines = [head, "-" * len(head)]
    for name in class_names:
        values = [results[m].get(f"oracle_iou/{name}", float("nan")) for m in methods]
        if all(np.isnan(v) for v in values):
            continue
        lines.append(f"{name:<24}" + "".join(f"{100 * v:17.1f}" for v in values))
    return "\n".join(lines)


def _log_mlflow(cfg: cfgmod.Config, root: Path, split: str | None,
                results: dict[str, dict[str, float]], class_names: list[str]) -> None:
    from rayseg.partition import is_oracle
    from rayseg.train.tracking import Tracker

    oracle = [m for m in results if is_oracle(m)]
    tracker = Tracker(cfg, run_name="partition-quality",
                      tags={"rayseg.command": "partition-quality", "dataset": str(root),
                            "split": split or "all", "partition.methods": ",".join(results),
                            "partition.oracle_methods": ",".join(oracle) or "none"})
    try:
        tracker.log_metrics({f"{m}/{k}": v for m, r in results.items() for k, v in r.items()
                             if np.isfinite(v)}, step=0)
        tracker.log_text(format_table(results) + "\n\n" + format_class_table(results, class_names) + "\n",
                         "partition_quality.txt")
    finally:
        tracker.end()
