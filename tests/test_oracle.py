"""The ORACLE row: `rayseg oracle-labels` writes a prepared dataset's train GT as a pseudo-label
folder (atomic, resumable, marked oracle), `rayseg segment` trains on it without a teacher and
tags its MLflow runs rayseg.oracle=true, and `rayseg report` shows that run as an ORACLE row.
On a tiny synthetic dataset, a real local Ray and a real sqlite MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray

from rayseg import cli
from rayseg import config as cfgmod
from rayseg import metrics as M
from rayseg import oracle, pseudo
from rayseg.data import pseudo_store, shards
from rayseg.data.prepare import prepare_synthetic
from rayseg.train import launch
from tiny import TINY, toml_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, experiment file, tmp dir) of a 4-train / 2-val synthetic dataset (no partition)."""
    tmp = tmp_path_factory.mktemp("oracle")
    flat = {**TINY, "data.root": str(tmp / "data"), "tracking.runs_dir": str(tmp / "runs"), "name": "tiny-oracle",
            "tracking.experiment": "oracle-table", "tracking.log_models": False,
            "tracking.system_metrics": False, "data.region_column": ""}  # stage seg needs no regions
    cfg = cfgmod.replace(cfgmod.Config(), **flat)
    launch.init_ray(cfg)
    assert prepare_synthetic(cfg.synthetic, cfg.data.root).ok
    exp_file = tmp / "tiny-oracle.toml"
    exp_file.write_text(toml_text(flat))
    yield cfg, exp_file, tmp
    ray.shutdown()


def _gt(root, split="train") -> dict[str, np.ndarray]:
    return {s["scene_id"]: s["label"] for s in (shards.read_scene(p, ["label"]) for p in shards.scene_paths(root, split))}


def test_oracle_labels_are_the_gt_resumable_and_marked(tiny, tmp_path, capsys):
    cfg, exp_file, _ = tiny
    out = tmp_path / "oracle"
    assert cli.main(["oracle-labels", str(exp_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ORACLE" in printed and "NOT pseudo-labels" in printed and "4 of 4 scenes written now" in printed

    gt = _gt(cfg.data.root)
    assert len(gt) == 4 and any((labels == 255).any() for labels in gt.values())  # ignored points exist
    meta = json.loads((out / pseudo_store.META_FILE).read_text())
    assert meta["oracle"] is True and meta["complete"] is True and meta["scenes"] == 4
    assert meta["kind"].startswith("ORACLE: ground-truth labels") and meta["source"].startswith("ORACLE-gt-")
    assert "checkpoint" not in meta and "run_dir" not in meta
    assert meta["settings"]["dataset"] == str(Path(cfg.data.root).resolve()) and meta["settings"]["split"] == "train"
    for sid, labels in gt.items():
        path = pseudo_store.pseudo_path(out, "train", sid)
        assert pseudo_store.file_source(path) == meta["source"]
        np.testing.assert_array_equal(pseudo_store.read_pseudo(path, sid, len(labels), meta["source"]), labels)
    assert sorted(p.stem for p in (out / "train").glob("*.parquet")) == sorted(gt)  # train split only

    # Resume: a removed scene is written again, the others are skipped (files untouched).
    files = sorted((out / "train").glob("*.parquet"))
    stamps = {p.name: p.stat().st_mtime_ns for p in files[1:]}
    files[0].unlink()
    again = oracle.write_oracle_labels(cfg.data.root, out)
    assert again["written"] == 1 and again["source"] == meta["source"] and again["complete"]
    assert {p.name: p.stat().st_mtime_ns for p in files[1:]} == stamps
    assert oracle.write_oracle_labels(cfg.data.root, out)["written"] == 0

    # The readers take the folder: verify (with an ORACLE note), check_folder, evaluation (mIoU 1).
    problems, notes = pseudo.verify_pseudo_labels(out)
    assert problems == [] and any(n.startswith("ORACLE") for n in notes)
    assert pseudo.check_folder(out, cfg.data.root, "train")["oracle"] is True
    names = shards.load_manifest(cfg.data.root)["class_names"]
    conf = pseudo.evaluate_pseudo_labels(out, cfg.data.root, "train", names)
    assert int(conf.sum()) == sum(int((v != 255).sum()) for v in gt.values())
    assert int(conf.sum()) == int(conf.diag().sum()) and M.mean_iou(conf) == pytest.approx(1.0)
    assert launch._teacher_of(out) == (None, 0)  # no teacher: stage seg's steps start at 0

    # A file of another source planted: refused naming it, rewritten with overwrite.
    planted = pseudo_store.pseudo_path(out, "train", sorted(gt)[1])
    pseudo_store.write_pseudo(planted, planted.stem, np.zeros(len(gt[planted.stem]), np.uint8), "somebody-else")
    with pytest.raises(pseudo_store.PseudoLabelError, match=planted.name):
        oracle.write_oracle_labels(cfg.data.root, out)
    assert cli.main(["oracle-labels", str(exp_file), "--out", str(out)]) == 2
    assert planted.name in capsys.readouterr().err
    assert oracle.write_oracle_labels(cfg.data.root, out, overwrite=True)["written"] == 1
    np.testing.assert_array_equal(pseudo_store.read_pseudo(planted), gt[planted.stem])

    # A teacher's pseudo-labelling refuses the oracle folder, saying what it holds.
    from rayseg.models.twobranch import TwoBranchModel
    import torch

    run_dir = launch.new_run_dir(cfg, "train")
    ckpt = run_dir / "checkpoints" / "000000004-cmg_rpc-e0001"
    ckpt.mkdir(parents=True)
    torch.save({"teacher": TwoBranchModel(cfg.model, len(names)).state_dict(), "progress": {"step": 4}},
               ckpt / "state.pt")
    with pytest.raises(pseudo_store.PseudoLabelError, match="ORACLE ground-truth labels"):
        pseudo.make_pseudo_labels(run_dir, out)


def test_oracle_folder_goes_stale_when_the_gt_changes(tiny, tmp_path):
    cfg, _, _ = tiny
    root = tmp_path / "data"
    shutil.copytree(cfg.data.root, root)
    out = tmp_path / "oracle"
    first = oracle.write_oracle_labels(root, out)
    path = shards.scene_paths(root, "train")[0]
    labels = shards.read_scene(path, ["label"])["label"].copy()
    labels[labels != 255] = (labels[labels != 255] + 1) % len(shards.load_manifest(root)["class_names"])
    shards.update_scene(path, {"label": labels})
    shards.refresh_manifest_entry(root, path)
    problems, _ = pseudo.verify_pseudo_labels(out)
    assert len(problems) == 1 and "dataset changed since" in problems[0] and "--overwrite" in problems[0]
    with pytest.raises(pseudo_store.PseudoLabelError, match="ORACLE labels of other ground truth"):
        oracle.write_oracle_labels(root, out)
    second = oracle.write_oracle_labels(root, out, overwrite=True)
    assert second["written"] == 4 and second["source"] != first["source"]  # one source: the whole split
    np.testing.assert_array_equal(pseudo_store.read_pseudo(pseudo_store.pseudo_path(out, "train", path.stem)), labels)
    assert pseudo.verify_pseudo_labels(out)[0] == []


def test_segment_on_the_oracle_is_tagged_and_reported(tiny, tmp_path, capsys):
    from rayseg import report
    from rayseg.evaluate import evaluate_run
    from rayseg.train import tracking, tune

    cfg, exp_file, _ = tiny
    out = tmp_path / "oracle"
    oracle.write_oracle_labels(cfg.data.root, out)
    capsys.readouterr()
    assert cli.main(["segment", str(exp_file), "--pseudo-labels", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[rayseg] ORACLE:" in printed and "GROUND-TRUTH labels" in printed
    seg_dir = Path(next(line for line in printed.splitlines() if line.startswith("run directory:")).split(": ", 1)[1])
    assert launch.load_run(seg_dir).data.pseudo_labels == str(out.resolve())

    record = tracking.read_record(seg_dir)
    uri = tracking.tracking_uri(cfg)
    client = mlflow.MlflowClient(tracking_uri=uri)
    pipeline = client.get_run(record["pipeline_run_id"])
    stage = client.get_run(record["stage_runs"]["seg"])
    for run in (pipeline, stage):
        assert run.data.tags["rayseg.oracle"] == "true", run.info.run_name
        assert run.data.tags["rayseg.oracle_what"] == "ground-truth labels"
        assert run.info.status == "FINISHED"
    assert stage.data.tags["mlflow.parentRunId"] == pipeline.info.run_id
    assert stage.data.tags.get(tracking.TAG_STEP_OFFSET, "0") == "0"
    loss = client.get_metric_history(stage.info.run_id, "loss")
    assert loss and min(m.step for m in loss) == 1  # steps from 0, not a teacher's

    evaluate_run(seg_dir, "val")  # logs val_3d_miou on the seg stage run, as `rayseg evaluate` does
    miou = client.get_run(stage.info.run_id).data.metrics["val_3d_miou"]

    # The report of a sweep in the same MLflow experiment shows the run as an ORACLE row.
    sweep_cfg = cfgmod.replace(cfg, **{"name": "oracle-table"})
    points = [{"loss.rpc.eta": 0.5}, {"loss.rpc.eta": 0.9}]
    sweep = tune.Sweep(name="s1", file=str(exp_file), points=points, sweep_dir=tmp_path / "sweep", resume=False,
                       experiment=cfgmod.Experiment(config=sweep_cfg, grid={}, path=str(exp_file)))
    parent = tune._start_parent_run(sweep)
    exp_id = client.get_experiment_by_name("oracle-table").experiment_id
    trial = client.create_run(exp_id, run_name=tune.trial_dir_name(0, points[0]),
                              tags={"mlflow.parentRunId": parent, tune.TAG_TRIAL: "0"})
    client.log_metric(trial.info.run_id, "pseudo_final_3d_miou", 0.25)
    client.set_terminated(trial.info.run_id, "FINISHED")
    result = report.run_report(uri, ["oracle-table"], "markdown", tmp_path / "reports", log=False)
    table = result["tables"]["oracle-table"]
    assert [o.run_id for o in table.oracle_rows] == [stage.info.run_id]
    line = next(x for x in result["text"].splitlines() if "**ORACLE**" in x)
    assert line == f"| **ORACLE** (ground-truth labels, {seg_dir.name}) | - | {100 * miou:.1f} |"
    assert report.ORACLE_NOTE in result["text"]
    assert report.best_row(table).index == 0  # an oracle is never the best trial
    csv_text = report.run_report(uri, ["oracle-table"], "csv", tmp_path / "reports2", log=False)["text"]
    oracle_rows = [r for r in csv_text.splitlines() if ",ORACLE," in r]
    assert len(oracle_rows) == 1 and stage.info.run_id in oracle_rows[0] and repr(miou) in oracle_rows[0]
    assert "ORACLE: ground-truth labels" in oracle_rows[0]
