"""`rayseg predict` for real: a model logged to a real sqlite MLflow store, the CLI run in a
subprocess on PLY files this test writes (one without normals, one without colours), outputs
checked against the same network run in this process; and the clear refusals (no colours,
empty file, zero vertices, another class set, not a model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rayseg import cli
from rayseg import config as cfgmod
from rayseg.data import shards
from rayseg.data.ply import read_ply, write_ply
from rayseg.data.scene import S3DIS13, SCANNET20
from rayseg.export import palette
from rayseg.predict import PointSegmenter, estimate_normals, log_segmenter
from rayseg.train.tracking import Tracker, tracking_uri

SPEC = {"backbone": "MinkUNet14A", "in_channels": 6, "num_classes": len(SCANNET20), "backend": "torch",
        "class_names": list(SCANNET20), "voxel_size": 0.1, "kind": "segmenter"}


def room(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points on the floor and two walls of a 3 x 2.5 x 2.4 m room, coloured by surface."""
    rng = np.random.default_rng(seed)
    side = rng.integers(0, 3, n)
    u, v = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    xyz = np.where(side[:, None] == 0, np.stack([3 * u, 2.5 * v, 0 * u], 1),
                   np.where(side[:, None] == 1, np.stack([3 * u, 0 * u, 2.4 * v], 1), np.stack([0 * u, 2.5 * u, 2.4 * v], 1)))
    rgb = np.array([[150, 120, 90], [220, 220, 210], [200, 190, 170]], np.uint8)[side]
    return xyz.astype(np.float32), rgb


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A randomly initialised segmenter logged as an MLflow model to a sqlite store."""
    tmp = tmp_path_factory.mktemp("predict")
    cfg = cfgmod.replace(cfgmod.Config(), **{"tracking.runs_dir": str(tmp / "runs"), "data.root": ""})
    import torch

    torch.manual_seed(0)
    segmenter = PointSegmenter(SPEC)
    run = Tracker(cfg, "predict-test", dataset_context=None)
    info = log_segmenter(cfg, run.run_id, segmenter, "segmenter")
    run.end()
    return {"tmp": tmp, "uri": info.model_uri, "store": tracking_uri(cfg), "segmenter": segmenter}


def test_predict_cli_on_own_ply_files(model, tmp_path):
    xyz, rgb = room(3000, 0)
    write_ply(tmp_path / "scan.ply", {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
                                      "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2]})
    xyz2, _ = room(1500, 1)
    write_ply(tmp_path / "grey.ply", {"x": xyz2[:, 0], "y": xyz2[:, 1], "z": xyz2[:, 2]})  # no colours
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "rayseg", "predict", model["uri"], str(tmp_path / "scan.ply"),
                           str(tmp_path / "grey.ply"), "--allow-no-color", "--out", str(out),
                           "--tracking-uri", model["store"]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The labels are the network's argmax on the scan with estimated normals (run here too).
    points = np.concatenate([xyz, rgb.astype(np.float32), estimate_normals(xyz)], 1)
    expected = model["segmenter"].predict(points)
    labels = np.load(out / "scan.labels.npy")
    assert labels.dtype == np.uint8 and np.array_equal(labels, expected)
    vertex = read_ply(out / "scan.labels.ply")["vertex"]
    assert np.array_equal(vertex["label"], labels)
    np.testing.assert_allclose(np.stack([vertex[a] for a in "xyz"], 1), xyz)
    colours = np.stack([vertex["red"], vertex["green"], vertex["blue"]], 1)
    assert np.array_equal(colours, palette(SCANNET20)[labels])
    header = (out / "scan.labels.ply").read_bytes().split(b"end_header")[0].decode()
    assert "comment class 0 wall" in header and "comment class 15 shower curtain" in header
    hist = json.loads((out / "scan.histogram.json").read_text())
    assert hist["points"] == 3000 and hist["normals"].startswith("estimated")
    assert [hist["counts"][c] for c in SCANNET20] == np.bincount(labels, minlength=20).tolist()
    grey = json.loads((out / "grey.histogram.json").read_text())
    assert grey["points"] == 1500 and "mid-grey" in grey["color"]
    rows = (out / "histogram.csv").read_text().splitlines()
    assert rows[0] == "scan,points," + ",".join(SCANNET20)
    assert [r.split(",")[0] for r in rows[1:]] == ["grey", "scan"]
    assert json.loads((out / "predict.json").read_text())["errors"] == []


def _predict(args: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(["predict", *args])
    return rc, capsys.readouterr().err


def test_predict_refuses_bad_input_by_name(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", model["store"])
    uri, out = model["uri"], str(tmp_path / "out")
    xyz, _ = room(200, 2)
    write_ply(tmp_path / "nocolor.ply", {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]})
    rc, err = _predict([uri, str(tmp_path / "nocolor.ply"), "--out", out], capsys)
    assert rc == 2 and "nocolor.ply: no vertex colours" in err and "--allow-no-color" in err
    (tmp_path / "empty.ply").write_bytes(b"")
    rc, err = _predict([uri, str(tmp_path / "empty.ply"), "--out", out], capsys)
    assert rc == 2 and "empty.ply: empty file" in err
    write_ply(tmp_path / "none.ply", {"x": np.zeros(0, np.float32), "y": np.zeros(0, np.float32),
                                      "z": np.zeros(0, np.float32), "red": np.zeros(0, np.uint8),
                                      "green": np.zeros(0, np.uint8), "blue": np.zeros(0, np.uint8)})
    rc, err = _predict([uri, str(tmp_path / "none.ply"), "--out", out], capsys)
    assert rc == 2 and "none.ply: the PLY has 0 vertices" in err
    rc, err = _predict([str(tmp_path), str(tmp_path / "nocolor.ply"), "--out", out], capsys)
    assert rc == 2 and "neither a run directory" in err

    # A prepared dataset of another class set (S3DIS-13) against a ScanNet-20 model.
    root = tmp_path / "s3dis"
    xyz, rgb = room(300, 3)
    shards.write_scene(root, {"scene_id": "Area_1_room_1", "split": "train", "coord": xyz, "color": rgb,
                              "normal": estimate_normals(xyz), "tags": np.eye(len(S3DIS13), dtype=np.uint8)[1],
                              "label": np.ones(300, np.uint8)})
    shards.write_manifest(root, "s3dis13")
    rc, err = _predict([uri, str(root), "--out", out], capsys)
    assert rc == 2 and "dataset classes (13: ceiling" in err and "differ from the model's (20: wall" in err
    assert not Path(out).exists()  # refused before anything was written
