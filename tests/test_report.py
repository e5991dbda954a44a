"""`rayseg report` on a real sqlite MLflow store laid out as `rayseg tune` lays it out (the parent
run made by tune's own code, child runs tagged as trials make them): a Table-8-shaped sweep with
a missing trial, an interrupted attempt that was superseded, an untagged child found by its run
name, an older sweep, and stage-seg val metrics. The report on a real Ray Tune sweep is
tests/test_tune.py::test_report_on_the_sweep."""

from __future__ import annotations

import csv
import io
import json

import mlflow
import pytest
from PIL import Image

from rayseg import config as cfgmod
from rayseg import report
from rayseg.train import tune

CLASSES = ("wall", "floor", "chair")
POINTS = [{"loss.rpc.eta": eta, "loss.rpc.mode": mode, "loss.rpc.threshold": thr}
          for mode, thr in (("point", "fixed"), ("region", "adaptive")) for eta in (0.1, 0.5, 0.9)]


def _metrics(index: int) -> dict[str, float]:
    """Distinct, exactly representable-in-neither-format values per trial."""
    m = {"pseudo_final_3d_miou": 0.301 + 0.0137 * index, "pseudo_final_2d_miou": 0.152 + 0.011 * index}
    m.update({f"pseudo_final_3d_iou/{c}": 0.2 + 0.1 * j + 0.01 * index for j, c in enumerate(CLASSES)})
    if index == 2:
        m["val_3d_miou"] = 0.4567
    return m


def _sweep(tmp_path, name: str) -> tune.Sweep:
    cfg = cfgmod.replace(cfgmod.Config(), **{"tracking.runs_dir": str(tmp_path / "runs"),
                                             "tracking.experiment": "table8", "name": "table8"})
    exp = cfgmod.Experiment(config=cfg, grid={}, path=str(tmp_path / "table8.toml"))
    return tune.Sweep(name=name, file=str(tmp_path / "table8.toml"), experiment=exp, points=POINTS,
                      sweep_dir=tmp_path / "runs" / name, resume=False)


@pytest.fixture
def store(tmp_path):
    """(tracking uri, client, parent run id, {index: child run id}) of the newest of two sweeps."""
    old = _sweep(tmp_path, "old-sweep")
    tune._start_parent_run(old)
    sweep = _sweep(tmp_path, "new-sweep")
    parent = tune._start_parent_run(sweep)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name("table8").experiment_id
    children = {}
    for index, point in enumerate(POINTS):
        if index == 3:
            continue  # never ran
        run_name = tune.trial_dir_name(index, point)
        tags = {"mlflow.parentRunId": parent, "mlflow.runName": run_name}
        if index != 4:  # trial 4 was interrupted before it was tagged: found by its run name
            tags.update({tune.TAG_TRIAL: str(index), tune.TAG_POINT: json.dumps(point)})
        if index == 1:  # an earlier attempt of trial 1 that never checkpointed, superseded
            stale = client.create_run(exp_id, run_name=run_name, tags={**tags, tune.TAG_SUPERSEDED: "true"})
            client.log_metric(stale.info.run_id, "pseudo_final_3d_miou", 0.99)
            client.set_terminated(stale.info.run_id, "KILLED")
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        for k, v in _metrics(index).items():
            client.log_metric(run.info.run_id, k, v)
        client.set_terminated(run.info.run_id, "FINISHED")
        children[index] = run.info.run_id
    return uri, client, parent, children


def test_table_values_equal_logged_metrics(store, tmp_path):
    uri, client, parent, children = store
    result = report.run_report(uri, ["table8"], "markdown", tmp_path / "out")
    text = result["text"]
    assert "Sweep `new-sweep`: 5 of 6 trials complete" in text
    assert "Other sweeps in this experiment (pick one with --sweep): old-sweep" in text
    assert "Trials without a final result: t003 (missing)" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == ("| rpc.eta | rpc.mode | rpc.threshold | pseudo-label 3D mIoU | pseudo-label 2D mIoU "
                        "| val 3D mIoU |")
    for index, point in enumerate(POINTS):
        m = _metrics(index) if index != 3 else {}
        cells = [str(point["loss.rpc.eta"]), point["loss.rpc.mode"], point["loss.rpc.threshold"]]
        cells += [f"{100 * m[k]:.1f}" if k in m else "-"
                  for k in ("pseudo_final_3d_miou", "pseudo_final_2d_miou", "val_3d_miou")]
        assert lines[1 + index] == "| " + " | ".join(cells) + " |"
    # Best trial = highest pseudo-label 3D mIoU among live runs (5; the superseded 0.99 is ignored).
    assert "best trial, t005 (rpc.eta=0.9, rpc.mode=region, rpc.threshold=adaptive)" in text
    assert "for reporting only" in text
    assert "| chair | 45.0 | - | - |" in text  # 0.2 + 0.1 * 2 + 0.01 * 5; no 2D / val per-class IoU logged

    rows = list(csv.DictReader(io.StringIO(report.run_report(uri, ["table8"], "csv", tmp_path / "out2",
                                                             log=False)["text"])))
    assert len(rows) == 6
    for row in rows:
        index = int(row["trial"])
        assert row["loss.rpc.mode"] == POINTS[index]["loss.rpc.mode"]
        assert float(row["loss.rpc.eta"]) == POINTS[index]["loss.rpc.eta"]
        if index == 3:
            assert row["status"] == "missing" and row["pseudo_final_3d_miou"] == ""
            continue
        assert row["run_id"] == children[index] and row["status"] == "FINISHED"
        for key in ("pseudo_final_3d_miou", "pseudo_final_2d_miou"):
            assert float(row[key]) == _metrics(index)[key]
    assert float(rows[2]["val_3d_miou"]) == 0.4567

    # Files and the parent run's artifacts; a numeric key with >= 3 values makes it a line plot.
    folder = tmp_path / "out" / "table8"
    assert sorted(p.name for p in folder.iterdir()) == ["best_per_class_iou.csv", "report.csv", "report.md",
                                                        "table8.png"]
    with Image.open(folder / "table8.png") as png:
        assert png.format == "PNG"
    table = result["tables"]["table8"]
    assert report._numeric_axis(table, {}) == "loss.rpc.eta"
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert logged == {"report/report.md", "report/report.csv", "report/table8.png", "report/best_per_class_iou.csv"}


def test_sweep_choice_and_bad_input(store, tmp_path):
    uri, client, _, _ = store
    old = report.run_report(uri, ["table8"], "markdown", tmp_path / "o", sweep="old-sweep", log=False)["text"]
    assert "Sweep `old-sweep`: 0 of 6 trials complete" in old
    assert "| rpc.eta | rpc.mode | rpc.threshold |\n" in old and "| 0.9 | region | adaptive |\n" in old
    with pytest.raises(report.ReportError, match="no sweep named 'nope'"):
        report.run_report(uri, ["table8"], sweep="nope", log=False)
    with pytest.raises(report.ReportError, match=r"no MLflow experiment 'table9'.*it has: .*table8"):
        report.run_report(uri, ["table9"], log=False)
    with pytest.raises(report.ReportError, match=r"tracking store .*missing.db does not exist"):
        report.run_report(f"sqlite:///{tmp_path / 'missing.db'}", ["table8"], log=False)
    client.create_experiment("empty")
    with pytest.raises(report.ReportError, match="experiment 'empty' has no sweep"):
        report.run_report(uri, ["empty"], log=False)


def test_bar_plot_without_numeric_axis(tmp_path):
    """Table-2-style rows (booleans / names): grouped bars, a valid PNG."""
    rows = [report.Row(index=i, point={"augment.mix3d": bool(i), "loss.guidance.loss_3d": name}, status="FINISHED",
                       metrics={"pseudo_final_3d_miou": 0.3 + 0.1 * i, "pseudo_final_2d_miou": 0.2})
            for i, name in enumerate(("none", "contrastive"))]
    table = report.SweepTable(experiment="t2", sweep="s", parent_run_id="x",
                              grid_keys=["augment.mix3d", "loss.guidance.loss_3d"], rows=rows, other_sweeps=[])
    assert report._numeric_axis(table, {}) is None
    path = report.plot(table, {}, tmp_path / "bars.png")
    with Image.open(path) as png:
        assert png.format == "PNG"
    md = report.markdown(table, {})
    assert "| off | none | 30.0 | 20.0 |" in md and "| on | contrastive | 40.0 | 20.0 |" in md
