"""Confusion matrix, IoU, tables, plots, CSV, and the all-reduce of counts across 2 gloo ranks."""

import csv
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from rayseg import losses, metrics

NAMES = ("wall", "floor", "chair", "shower curtain")

# gt:   0 0 1 1 2 255 ; pred: 0 1 1 1 0 2  (the last pair is ignored)
TARGET = np.array([0, 0, 1, 1, 2, 255], dtype=np.uint8)
PRED = np.array([0, 1, 1, 1, 0, 2])


def test_confusion_matrix_and_iou_on_a_constructed_case():
    conf = metrics.confusion_matrix(PRED, TARGET, num_classes=4)
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    iou = metrics.iou_per_class(conf)
    # wall: TP 1, FP 1 (gt chair), FN 1 (pred floor) -> 1/3; floor: 2/(2+1) ; chair: 0/1 ;
    # shower curtain: never seen nor predicted -> NaN and left out of the mean
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(iou[3])
    assert metrics.mean_iou(conf) == pytest.approx(1 / 3)
    assert metrics.overall_accuracy(conf) == pytest.approx(3 / 5)
    # accumulating batches = one big batch
    acc = metrics.confusion_matrix(PRED[:3], TARGET[:3], 4) + metrics.confusion_matrix(PRED[3:], TARGET[3:], 4)
    assert torch.equal(acc, conf)
    # a class predicted but never in GT has union > 0 and IoU 0: it counts in the mean
    conf2 = metrics.confusion_matrix(torch.tensor([3, 0]), torch.tensor([0, 0]), 4)
    assert metrics.iou_per_class(conf2)[3] == 0.0 and metrics.mean_iou(conf2) == pytest.approx(0.25)


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match="label 7, outside 0..3"):
        metrics.confusion_matrix([0, 1], [0, 7], 4)
    with pytest.raises(ValueError, match="prediction holds class 4"):
        metrics.confusion_matrix([0, 4], [0, 1], 4)
    with pytest.raises(ValueError, match="3 entries but target has 2"):
        metrics.confusion_matrix([0, 1, 2], [0, 1], 4)
    assert metrics.confusion_matrix([9], [255], 4).sum() == 0  # ignored targets may carry any prediction
    assert math.isnan(metrics.mean_iou(torch.zeros(4, 4, dtype=torch.int64)))


def test_table_and_metrics_dict_use_class_names():
    conf = metrics.confusion_matrix(PRED, TARGET, 4)
    table = metrics.iou_table(conf, NAMES, title="val 3D")
    lines = table.splitlines()
    assert lines[0] == "val 3D"
    floor = next(line for line in lines if line.startswith("floor"))
    assert "66.67" in floor and floor.split()[-1] == "2"
    assert "n/a" in next(line for line in lines if line.startswith("shower curtain"))
    assert lines[-2].split()[-1] == "33.33" and lines[-1].split()[-1] == "60.00"
    d = metrics.metrics_dict(conf, NAMES, prefix="val/")
    assert d["val/miou"] == pytest.approx(1 / 3) and d["val/iou/floor"] == pytest.approx(2 / 3)
    assert "val/iou/shower_curtain" not in d
    with pytest.raises(ValueError, match="does not match 3 class names"):
        metrics.iou_table(conf, NAMES[:3])


def test_csv_and_png_outputs(tmp_path):
    conf = metrics.confusion_matrix(PRED, TARGET, 4)
    csv_path = metrics.write_iou_csv(conf, NAMES, tmp_path / "out" / "iou.csv")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == list(NAMES)
    assert float(rows[1]["iou"]) == pytest.approx(2 / 3) and rows[3]["iou"] == ""
    assert (rows[0]["tp"], rows[0]["fp"], rows[0]["fn"], rows[0]["gt_count"]) == ("1", "1", "1", "2")
    for fn, name in ((metrics.plot_confusion, "confusion.png"), (metrics.plot_iou_bars, "iou.png")):
        path = fn(conf, NAMES, tmp_path / "out" / name)
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["confusion.png", "iou.csv", "iou.png"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce_worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = slice(0, 3) if rank == 0 else slice(3, 6)
        conf = metrics.all_reduce_sum(metrics.confusion_matrix(PRED[half], TARGET[half], 4))
        assert torch.equal(conf, metrics.confusion_matrix(PRED, TARGET, 4)), conf
        # RPC threshold counts: each rank contributes its accepted counts; every rank ends with the sum
        state = losses.ThresholdState(num_classes=3, eta=0.8, adaptive=True)
        local = torch.tensor([4, 0, 1]) if rank == 0 else torch.tensor([0, 2, 1])
        state.update(metrics.all_reduce_sum(local.clone()))
        assert state.counts.tolist() == [4, 2, 2], state.counts
        assert state.thresholds().tolist() == pytest.approx([0.8, 0.4, 0.4])
    finally:
        torch.distributed.destroy_process_group()


def test_all_reduce_sums_counts_across_two_gloo_processes():
    assert torch.equal(metrics.all_reduce_sum(torch.tensor([1, 2])), torch.tensor([1, 2]))  # no group: no-op
    mp.spawn(_all_reduce_worker, args=(2, _free_port()), nprocs=2, join=True)
