"""MLflow as a researcher sees it, against a real sqlite store after a real tiny pipeline: the
experiment's kind, the run tree (pipeline -> stages), source / git / dataset / config on runs,
stage-free metric names on one step axis, weighted loss terms, system metrics, per-epoch
artifacts, and the teacher / segmenter as MLflow models that load back and predict what the
checkpoints predict."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
import torch

from rayseg import config as cfgmod
from rayseg.data import shards
from rayseg.data.prepare import prepare_synthetic
from rayseg.partition.job import run_partition
from rayseg.predict import PointSegmenter, segmenter_from_run
from rayseg.train import launch, tracking
from rayseg.train.loop import latest_checkpoint
from tiny import TINY

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    """A tiny dataset, `rayseg train`, `pseudo-label` and `segment` on it (each its own pipeline)."""
    tmp = tmp_path_factory.mktemp("tracking")
    cfg = cfgmod.replace(cfgmod.Config(), **{
        **TINY, "data.root": str(tmp / "data"), "tracking.runs_dir": str(tmp / "runs"), "name": "tiny",
        "tracking.system_metrics_interval": 0.5, "tracking.register_models": True,
        "data.num_views": 0})  # 3D only: the tracking is under test, not the 2D branch
    launch.init_ray(cfg)
    assert prepare_synthetic(cfg.synthetic, cfg.data.root).ok
    assert run_partition(cfg.data.root, ["shape_detection"], cfg).ok
    train_dir = launch.train(cfg)
    pl = launch.pseudo_label(train_dir, tmp / "pl")
    seg_dir = launch.segment(cfg, str(tmp / "pl"))
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    yield {"cfg": cfg, "tmp": tmp, "train_dir": train_dir, "pl": pl, "seg_dir": seg_dir, "client": client}
    ray.shutdown()


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_experiment_and_run_tree(pipeline_runs):
    cfg, client, train_dir = pipeline_runs["cfg"], pipeline_runs["client"], pipeline_runs["train_dir"]
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # artifacts beside the sqlite file, not ./mlruns of the working directory
    assert exp.artifact_location == (Path(cfg.tracking.runs_dir).resolve() / "mlartifacts").as_uri()

    record = tracking.read_record(train_dir)
    parent = client.get_run(record["pipeline_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags[tracking.TAG_PIPELINE] == "train"
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["cmg", "cmg_rpc"]
    assert {c.info.run_id for c in children} == set(record["stage_runs"].values())
    digest = tracking.manifest_digest(cfg.data.root)
    for run in [parent, *children]:
        tags = run.data.tags
        # the checkout's commit (others may commit while the test runs: an ancestor of HEAD)
        assert subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", tags["mlflow.source.git.commit"],
                               "HEAD"]).returncode == 0
        assert tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
        assert run.data.params["loss.rpc.eta"] == str(cfg.loss.rpc.eta)  # the resolved config
        assert "config.toml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        (dataset,) = run.inputs.dataset_inputs
        assert dataset.dataset.digest == digest and dataset.dataset.name == "data"
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags[tracking.TAG_STAGE] == child.info.run_name


def test_metrics_one_step_axis_without_stage_prefix(pipeline_runs):
    client, train_dir, seg_dir = pipeline_runs["client"], pipeline_runs["train_dir"], pipeline_runs["seg_dir"]
    stages = tracking.read_record(train_dir)["stage_runs"]
    cmg, rpc = client.get_run(stages["cmg"]), client.get_run(stages["cmg_rpc"])
    for run in (cmg, rpc):
        keys = set(run.data.metrics)
        assert not [k for k in keys if k.startswith(("cmg/", "cmg_rpc/", "seg/"))]
        assert {"loss", "lr", "stage", "epoch/loss", "scenes_per_s", "loss/cls_3d", "loss_weighted/cls_3d",
                "weight/cls_3d", "pseudo_3d_miou"} <= keys
        # rank 0's system metrics (CPU, memory), sampled while the stage ran
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    # 4 train scenes, batch 2: steps 1-2 are stage cmg, 3-4 stage cmg_rpc (one axis)
    assert [s for s, _ in _history(client, cmg.info.run_id, "loss")] == [1, 2]
    assert [s for s, _ in _history(client, rpc.info.run_id, "loss")] == [3, 4]
    assert {v for _, v in _history(client, rpc.info.run_id, "stage")} == {float(tracking.STAGE_INDEX["cmg_rpc"])}
    assert "loss_weighted/rpc_3d" in rpc.data.metrics and "rpc_3d" not in str(sorted(cmg.data.metrics))
    # the weighted term is weight x term, step by step; the total is their sum
    weighted = dict(_history(client, rpc.info.run_id, "loss_weighted/rpc_3d"))
    weight, term = dict(_history(client, rpc.info.run_id, "weight/rpc_3d")), dict(_history(client, rpc.info.run_id, "loss/rpc_3d"))
    for step in (3, 4):
        assert weighted[step] == pytest.approx(weight[step] * term[step], rel=1e-6)
    total = dict(_history(client, rpc.info.run_id, "loss"))
    parts = [k for k in rpc.data.metrics if k.startswith("loss_weighted/")]
    assert total[4] == pytest.approx(sum(dict(_history(client, rpc.info.run_id, k))[4] for k in parts), rel=1e-4)
    # per-epoch artifacts in per-epoch folders
    assert "pseudo_3d/epoch_001" in {a.path for a in client.list_artifacts(rpc.info.run_id, "pseudo_3d")}

    # pseudo-labels: the final mIoU at the teacher's last step; seg continues after it
    pl = pipeline_runs["pl"]
    assert [s for s, _ in _history(client, pl["run_id"], "pseudo_final_3d_miou")] == [4]
    assert _history(client, pl["pipeline_run_id"], "pseudo_final_3d_miou")[0][0] == 4
    seg_run = tracking.read_record(seg_dir)["stage_runs"]["seg"]
    assert [s for s, _ in _history(client, seg_run, "loss")] == [5, 6]
    from rayseg.evaluate import evaluate_run

    evaluate_run(seg_dir, "val")
    assert [s for s, _ in _history(client, seg_run, "val_3d_miou")] == [6]  # the last point of the axis


def test_models_logged_and_loadable(pipeline_runs, monkeypatch):
    cfg, client = pipeline_runs["cfg"], pipeline_runs["client"]
    train_dir, seg_dir, pl = pipeline_runs["train_dir"], pipeline_runs["seg_dir"], pipeline_runs["pl"]
    names = tuple(shards.load_manifest(cfg.data.root)["class_names"])
    teacher = tracking.read_record(train_dir)["models"]["teacher"]
    segmenter = tracking.read_record(seg_dir)["models"]["segmenter"]
    for model, stage_run, name in ((teacher, tracking.read_record(train_dir)["stage_runs"]["cmg_rpc"], "teacher"),
                                   (segmenter, tracking.read_record(seg_dir)["stage_runs"]["seg"], "segmenter")):
        logged = client.get_logged_model(model["model_id"])
        assert logged.source_run_id == stage_run and logged.name == name
        assert tuple(json.loads(logged.tags["rayseg.class_names"])) == names
        assert model["model_id"] in [m.model_id for m in client.get_run(stage_run).outputs.model_outputs]
        versions = client.search_model_versions(f"name = 'tiny-{name}'")  # tracking.register_models
        assert [str(v.version) for v in versions] == ["1"]
    # the pseudo-label and seg stages name the teacher they used as an input
    seg_stage = tracking.read_record(seg_dir)["stage_runs"]["seg"]
    for run_id in (pl["run_id"], seg_stage):
        assert [m.model_id for m in client.get_run(run_id).inputs.model_inputs] == [teacher["model_id"]]

    # Round trip through MLflow: the same predictions as the checkpoint's network, which in turn
    # are the training pipeline's eval-mode argmax (same voxelisation).
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    loaded = mlflow.pytorch.load_model(segmenter["uri"])
    assert isinstance(loaded, PointSegmenter) and loaded.class_names == names
    info = mlflow.models.get_model_info(segmenter["uri"])
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 9)
    assert info.metadata["class_names"] == list(names)
    from_ckpt = segmenter_from_run(seg_dir)
    scene_path = shards.scene_paths(cfg.data.root, "val")[0]
    scene = shards.read_scene(scene_path, ["coord", "color", "normal"])
    points = np.concatenate([scene["coord"], scene["color"].astype(np.float32), scene["normal"]], 1)
    pred = loaded.predict(points)
    assert np.array_equal(pred, from_ckpt.predict(points))

    from rayseg.train.loop import build_models, iter_rank_batches, stage_config, to_device

    seg_cfg = stage_config(launch.load_run(seg_dir), "seg")
    net, _ = build_models(seg_cfg, len(names), "seg")
    net.load_state_dict(torch.load(latest_checkpoint(seg_dir), weights_only=True)["student"])
    net.eval()
    batch = next(b for b in iter_rank_batches(seg_cfg, "val", "eval", 0, 0, 1, 1) if b["scene_id"] == [scene_path.stem])
    b = to_device(batch, torch.device("cpu"))
    with torch.no_grad():
        ref = net(b["coord"], b["feat"])[1][b["inverse"]].argmax(1).numpy()
    assert np.array_equal(pred, ref)


def test_predict_on_a_run_directory_and_a_dataset(pipeline_runs, tmp_path):
    """`rayseg predict` (in-process) with a train run directory (the EMA teacher) on the val
    split of a prepared dataset: outputs per scan, one histogram row per scan."""
    from rayseg.predict import run_predict

    cfg, train_dir = pipeline_runs["cfg"], pipeline_runs["train_dir"]
    result = run_predict(str(train_dir), [cfg.data.root], tmp_path / "out", split="val")
    val = shards.scene_paths(cfg.data.root, "val")
    assert result["errors"] == [] and result["scans"] == sorted(p.stem for p in val)
    teacher = segmenter_from_run(train_dir)
    for path in val:
        scene = shards.read_scene(path, ["coord", "color", "normal"])
        points = np.concatenate([scene["coord"], scene["color"].astype(np.float32), scene["normal"]], 1)
        assert np.array_equal(np.load(tmp_path / "out" / f"{path.stem}.labels.npy"), teacher.predict(points))
    rows = (tmp_path / "out" / "histogram.csv").read_text().splitlines()
    assert len(rows) == 1 + len(val) and rows[0].startswith("scan,points,")


# Four processes that open one fresh runs directory's store at the same moment (two `rayseg train`
# started together): MLflow's schema migrations are not safe to run concurrently, and without
# tracking's creation lock three of the four died ("Online migration expected to match one row").
OPEN_STORE = """
import sys
from rayseg import config as cfgmod
from rayseg.train import tracking
cfg = cfgmod.replace(cfgmod.Config(), **{"tracking.runs_dir": sys.argv[1], "tracking.experiment": "race"})
print(tracking.experiment_id(tracking.client_for(cfg), cfg))
"""


def test_a_fresh_store_opened_by_four_processes_at_once(tmp_path):
    import sys

    runs = tmp_path / "runs"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, str(runs)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
    assert len({out.strip().splitlines()[-1] for out, _ in outs}) == 1  # one experiment, the same id
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    assert [e.name for e in client.search_experiments() if e.name == "race"] == ["race"]


def test_a_run_logging_a_dataset_another_run_inserts_at_the_same_moment(tmp_path):
    """Two Tune trials open their runs at once: MLflow's SQL store checks that the dataset is
    new, the other trial inserts it, and this insert fails on the unique constraint. The
    interleaving is made exact here: a SQLAlchemy hook lets a second, independent client log the
    same dataset just before the first client's INSERT INTO datasets runs."""
    import sqlalchemy

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"scenes": ["a"]}))
    cfg = cfgmod.replace(cfgmod.Config(), **{"tracking.runs_dir": str(tmp_path / "runs"), "tracking.experiment": "race"})
    first, second = tracking.client_for(cfg), tracking.client_for(cfg)
    exp = tracking.experiment_id(first, cfg)
    run_a, run_b = (first.create_run(exp).info.run_id for _ in range(2))
    raced = []

    def other_trial_first(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO DATASETS") and not raced:
            raced.append(statement)
            tracking.log_dataset(second, run_b, data, "train")  # commits on its own connection

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", other_trial_first)
    try:
        tracking.log_dataset(first, run_a, data, "train")
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", other_trial_first)
    assert raced, "the hook never saw MLflow insert the dataset: the race was not reproduced"
    digests = {run: [i.dataset.digest for i in first.get_run(run).inputs.dataset_inputs] for run in (run_a, run_b)}
    assert digests[run_a] == digests[run_b] == [tracking.manifest_digest(data)]
