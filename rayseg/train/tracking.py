"""MLflow tracking, rank 0 only.

The tracking URI comes from ``cfg.tracking.uri``; empty means a sqlite store under the runs
directory (MLflow 3 refuses the plain file store). mlflow is imported lazily so that workers
that never log (rank != 0) do not pay for it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from rayseg import config as cfgmod

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri(cfg: cfgmod.Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    runs = Path(cfg.tracking.runs_dir).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{runs / 'mlflow.db'}"


def artifact_location(cfg: cfgmod.Config) -> str | None:
    """With the default sqlite store, artifacts live beside it (<runs_dir>/mlartifacts) instead
    of ./mlruns of whatever directory the process started in; a tracking server decides itself."""
    if cfg.tracking.uri:
        return None
    return (Path(cfg.tracking.runs_dir).resolve() / "mlartifacts").as_uri()


class Tracker:
    """A thin, explicit wrapper around one MLflow run. Disabled (all no-ops) off rank 0."""

    def __init__(self, cfg: cfgmod.Config, run_name: str, *, enabled: bool = True,
                 run_id: str | None = None, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None):
        self.enabled = enabled
        self.run_id: str | None = None
        if not enabled:
            return
        import mlflow

        self._mlflow = mlflow
        self._client = mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))
        if run_id is None:
            exp = self._client.get_experiment_by_name(cfg.tracking.experiment)
            exp_id = exp.experiment_id if exp else self._client.create_experiment(
                cfg.tracking.experiment, artifact_location=artifact_location(cfg))
            all_tags = {"mlflow.runName": run_name, **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self._client.create_run(exp_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id
            self.log_params(cfgmod.flatten(cfgmod.to_dict(cfg)))
            self.log_text(cfgmod.dumps(cfg), "config.toml")
        else:  # resuming: keep logging into the same run
            self.run_id = run_id
            self._client.update_run(run_id, status="RUNNING")

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, str(v))

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_confusion(self, conf, class_names, prefix: str, step: int) -> dict[str, float]:
        """Per-class IoU + mIoU metrics, a CSV and PNG plots of a confusion matrix (counts)."""
        from rayseg import metrics as M

        values = M.metrics_dict(conf, class_names, prefix=f"{prefix}_")
        self.log_metrics(values, step)
        if self.enabled:
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                M.write_iou_csv(conf, class_names, tmp / f"{prefix}_iou.csv")
                M.plot_confusion(conf, class_names, tmp / f"{prefix}_confusion.png", title=f"{prefix} confusion")
                M.plot_iou_bars(conf, class_names, tmp / f"{prefix}_iou.png", title=f"{prefix} per-class IoU")
                for f in sorted(tmp.iterdir()):
                    self.log_file(f, prefix)
        return values

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self._client.set_terminated(self.run_id, status=status)
