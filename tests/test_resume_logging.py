"""A resumed stage replays the steps between its last checkpoint and the crash: each (metric,
step) reaches MLflow once (a real sqlite store)."""

from __future__ import annotations

import mlflow

from rayseg import config as cfgmod
from rayseg.train.tracking import Tracker


def test_replayed_steps_are_logged_once(tmp_path):
    cfg = cfgmod.replace(cfgmod.Config(), **{"tracking.runs_dir": str(tmp_path / "runs"), "data.root": ""})
    first = Tracker(cfg, "cmg", dataset_context=None)
    for step in range(1, 6):  # checkpoint at step 2, crash after step 5
        first.log_metrics({"loss": 10.0 - step, "lr": 0.1}, step)
    first.log_metrics({"epoch/loss": 8.5}, 2)

    resumed = Tracker(cfg, "cmg", run_id=first.run_id, dataset_context=None)
    resumed.skip_logged_steps()
    for step in range(3, 9):  # the replay from the checkpoint, then new steps
        resumed.log_metrics({"loss": 100.0 + step, "lr": 0.1}, step)
    resumed.log_metrics({"epoch/loss": 7.0}, 4)  # a key whose last point is older: logged
    resumed.end()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    loss = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "loss"))
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6, 7, 8]  # once each
    assert [v for _, v in loss] == [9.0, 8.0, 7.0, 6.0, 5.0, 106.0, 107.0, 108.0]
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "lr")) == list(range(1, 9))
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "epoch/loss")) == [2, 4]

    # Without a resume (another Tracker of the same run, e.g. an evaluation) nothing is left out.
    again = Tracker(cfg, "cmg", run_id=first.run_id, dataset_context=None)
    again.log_metrics({"loss": 1.0}, 8)
    again.end()
    assert len(client.get_metric_history(first.run_id, "loss")) == 9
