"""MLflow tracking: the run tree, metrics on one step axis, system metrics, dataset inputs.

Run tree. Every pipeline (`rayseg train`, `segment`, `pseudo-label`, `demo`, one Tune trial) is
one parent run; each stage it runs (cmg, cmg_rpc, pseudo_label, seg) is a child run of it. A Tune
sweep adds one level: sweep -> trial -> stages. A run directory remembers its runs in
``<run_dir>/mlflow.json`` (the pipeline run, the stage runs, the logged models), so a resumed
run keeps logging into the same MLflow runs.

Metric names carry no stage prefix (``loss``, ``loss/cls_3d``, ``lr``...), so stage runs of
different pipelines share charts; which stage a point belongs to is the ``stage`` metric (its
index in STAGE_INDEX) and the run's ``rayseg.stage`` tag. Steps are one axis across the stages
of a pipeline: a stage run starts where the previous stage ended (its offset is the
``rayseg.step_offset`` tag, added to every step logged to that run).

The tracking URI comes from ``cfg.tracking.uri``; empty means a sqlite store under the runs
directory (MLflow 3 refuses the plain file store). With a sqlite store, artifacts live beside the
database file (``mlartifacts/`` next to it), never in ``./mlruns`` of the current directory.
mlflow is imported lazily so that workers that never log (rank != 0) do not pay for it.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from rayseg import config as cfgmod

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# The MLflow UI opens an experiment on its model-training view with this tag (otherwise it may
# open the GenAI overview); the value is what the UI itself writes for "custom model training".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RUN_RECORD = "mlflow.json"
# The `stage` metric: where on the shared step axis each stage's points come from.
STAGE_INDEX = {"cmg": 0, "cmg_rpc": 1, "pseudo_label": 2, "seg": 3}
TAG_STAGE = "rayseg.stage"
TAG_PIPELINE = "rayseg.pipeline"
TAG_STEP_OFFSET = "rayseg.step_offset"
SOURCE_TAGS = ("mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit",
               "mlflow.source.git.branch", "mlflow.source.git.dirty", "mlflow.user")


def tracking_uri(cfg: cfgmod.Config) -> str:
    if cfg.tracking.uri:
        uri = cfg.tracking.uri
    else:
        runs = Path(cfg.tracking.runs_dir).resolve()
        runs.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{runs / 'mlflow.db'}"
    db = _sqlite_db(uri)
    if db is not None:
        _create_sqlite_store_once(db, uri)
    return uri


def _sqlite_db(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, else None (a tracking server)."""
    return Path(uri[len("sqlite:///"):]).resolve() if uri.startswith("sqlite:///") else None


def _create_sqlite_store_once(db: Path, uri: str) -> None:
    """Create a new sqlite store's schema in one process at a time. MLflow builds it on first use
    with alembic migrations that are not safe to run concurrently: of four commands started
    together on a fresh runs directory (two `rayseg train` at once, say), three died with
    "Online migration expected to match one row ... 0 found". A marker file written after the
    schema is complete lets every later open skip the lock (a store found without it, e.g. made by
    an older rayseg, is opened once under the lock, which migrates nothing)."""
    ready = db.parent / f".{db.name}.ready"
    if ready.is_file():
        return
    import fcntl

    import mlflow

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / f".{db.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process closes it or dies
        if not ready.is_file():
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # builds the schema
            ready.touch()


def artifact_location(cfg: cfgmod.Config) -> str | None:
    """For a sqlite store (the default one or an explicit sqlite:/// URI): <db dir>/mlartifacts,
    instead of ./mlruns of whatever directory the process started in. A tracking server (http)
    decides itself (None)."""
    db = _sqlite_db(tracking_uri(cfg))
    return None if db is None else (db.parent / "mlartifacts").as_uri()


def client_for(cfg: cfgmod.Config):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))


def experiment_id(client, cfg: cfgmod.Config) -> str:
    """The experiment of cfg.tracking.experiment, created if missing (artifacts beside a sqlite
    store) and tagged so the UI opens it on model training."""
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        from mlflow.exceptions import MlflowException

        try:
            exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(cfg),
                                              tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created concurrently (Tune trials, Ray workers)
            exp_id = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
        return exp_id
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


_SOURCE: dict[str, str] | None = None


def source_tags() -> dict[str, str]:
    """What the UI shows as a run's source: the command line, the user, and the git commit (plus
    branch and whether the tree had uncommitted changes) of the checkout rayseg runs from."""
    global _SOURCE
    if _SOURCE is None:
        argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"] + sys.argv[1:]
        if argv[0] in ("__main__.py", "-m"):
            argv[0] = "rayseg"
        tags = {"mlflow.source.name": " ".join(argv)[:500], "mlflow.source.type": "LOCAL"}
        try:
            tags["mlflow.user"] = getpass.getuser()
        except (KeyError, OSError):
            pass
        repo = Path(__file__).resolve().parents[2]

        def git(*args: str) -> str | None:
            try:
                out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.SubprocessError):
                return None
            return out.stdout.strip() if out.returncode == 0 else None

        if (repo / ".git").exists():
            commit = git("rev-parse", "HEAD")
            if commit:
                tags["mlflow.source.git.commit"] = commit
                tags["mlflow.source.git.branch"] = git("rev-parse", "--abbrev-ref", "HEAD") or ""
                status = git("status", "--porcelain", "--untracked-files=no")
                if status is not None:
                    tags["mlflow.source.git.dirty"] = str(bool(status)).lower()
        _SOURCE = tags
    return dict(_SOURCE)


def manifest_digest(root: str | Path) -> str | None:
    """A short content digest of a prepared dataset (its manifest.json: scene list, checksums)."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def log_dataset(client, run_id: str, root: str | Path, context: str, name: str | None = None) -> None:
    """The prepared dataset as an MLflow dataset input (name, manifest digest, local source)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    digest = manifest_digest(root)
    if digest is None:
        return
    root = Path(root).resolve()
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(root))
    dataset = MetaDataset(source=source, name=name or root.name, digest=digest)
    inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
    try:
        client.log_inputs(run_id, datasets=inputs)
    except Exception as exc:  # noqa: BLE001 - MLflow wraps the database's error in its own
        if not _lost_dataset_race(exc):
            raise
        # Another run (e.g. a Tune trial opening its run at the same moment) inserted this dataset
        # between MLflow's check and its insert; the transaction rolled back and the row exists
        # now, so the second attempt links the run to it.
        client.log_inputs(run_id, datasets=inputs)


def _lost_dataset_race(exc: BaseException) -> bool:
    """Whether exc is the SQL store's unique-constraint failure on its datasets table."""
    return type(exc.__cause__).__name__ == "IntegrityError" and "datasets" in str(exc.__cause__)


class Tracker:
    """A thin, explicit wrapper around one MLflow run. Disabled (all no-ops) off rank 0.

    New run (run_id None): tagged with the source (command, git commit, user), `tags`, the
    parent; the resolved config as params and config.toml; the dataset (data.root) as an input.
    Existing run (run_id given, e.g. a resumed stage or an evaluation of a finished one): marked
    RUNNING again, and its step offset is read back. `system_metrics`: sample CPU / memory / disk
    / network (GPU where pynvml finds one) into the run's ``system/*`` metrics until `end`, when
    cfg.tracking.system_metrics is on."""

    def __init__(self, cfg: cfgmod.Config, run_name: str, *, enabled: bool = True,
                 run_id: str | None = None, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, step_offset: int = 0, system_metrics: bool = False,
                 dataset_context: str | None = "train"):
        self.enabled = enabled
        self.run_id: str | None = None
        self.step_offset = 0
        self._monitor = None
        self._logged_through: dict[str, int] | None = None  # see skip_logged_steps
        if not enabled:
            return
        import mlflow

        self._mlflow = mlflow
        self.uri = tracking_uri(cfg)
        self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        if run_id is None:
            exp_id = experiment_id(self._client, cfg)
            all_tags = {**source_tags(), "mlflow.runName": run_name, **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
                # Stage runs of a worker inherit the pipeline's source (workers may run from a copy
                # of the code without .git).
                parent_tags = self._client.get_run(parent_run_id).data.tags
                all_tags.update({k: parent_tags[k] for k in SOURCE_TAGS if k in parent_tags})
            all_tags[TAG_STEP_OFFSET] = str(int(step_offset))
            run = self._client.create_run(exp_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id
            self.step_offset = int(step_offset)
            self.log_params(cfgmod.flatten(cfgmod.to_dict(cfg)))
            self.log_text(cfgmod.dumps(cfg), "config.toml")
            if dataset_context and cfg.data.root:
                log_dataset(self._client, self.run_id, cfg.data.root, dataset_context)
        else:  # resuming: keep logging into the same run
            self.run_id = run_id
            run = self._client.get_run(run_id)
            self.step_offset = int(run.data.tags.get(TAG_STEP_OFFSET, "0"))
            self._client.update_run(run_id, status="RUNNING")
        if system_metrics and cfg.tracking.system_metrics:
            self._start_system_metrics(cfg, resume=run_id is not None)

    def _start_system_metrics(self, cfg: cfgmod.Config, resume: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=cfg.tracking.system_metrics_interval,
                                                 resume_logging=resume, tracking_uri=self.uri)
            self._monitor.start()
        except ImportError as exc:  # psutil missing: a warning, not a failed run
            print(f"[rayseg] WARNING: no system metrics ({exc}); install psutil, or set "
                  f"tracking.system_metrics = false", flush=True)
            self._monitor = None

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Metrics at `step` of this run's stage (the step offset is added here)."""
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step) + self.step_offset) for k, v in metrics.items()]
        if self._logged_through is not None:
            items = [m for m in items if m.step > self._last_logged_step(m.key)]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def skip_logged_steps(self) -> None:
        """From now on, leave out a metric at a step this run already holds for that key: a
        resumed stage replays the steps between its last checkpoint and the crash, which were
        logged before the crash (their values are what the replay recomputes)."""
        if self.enabled:
            self._logged_through = {}

    def _last_logged_step(self, key: str) -> int:
        if key not in self._logged_through:  # one history query per key, on first use
            history = self._client.get_metric_history(self.run_id, key)
            self._logged_through[key] = max((m.step for m in history), default=-1)
        return self._logged_through[key]

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

    def log_confusion(self, conf, class_names, prefix: str, step: int, epoch: int | None = None) -> dict[str, float]:
        """Per-class IoU + mIoU metrics, a CSV and PNG plots of a confusion matrix (counts). The
        files go under ``<prefix>/epoch_NNN/`` when `epoch` is given (one folder per epoch,
        nothing overwritten), else under ``<prefix>/``."""
        from rayseg import metrics as M

        values = M.metrics_dict(conf, class_names, prefix=f"{prefix}_")
        self.log_metrics(values, step)
        if self.enabled:
            folder = prefix if epoch is None else f"{prefix}/epoch_{int(epoch):03d}"
            title = prefix if epoch is None else f"{prefix}, epoch {epoch}"
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                M.write_iou_csv(conf, class_names, tmp / f"{prefix}_iou.csv")
                M.plot_confusion(conf, class_names, tmp / f"{prefix}_confusion.png", title=f"{title} confusion")
                M.plot_iou_bars(conf, class_names, tmp / f"{prefix}_iou.png", title=f"{title} per-class IoU")
                for f in sorted(tmp.iterdir()):
                    self.log_file(f, folder)
        return values

    def end(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if self.enabled and self.run_id:
            self._client.set_terminated(self.run_id, status=status)


# --------------------------------------------------------------------------------------------
# Metric names (the training loop's floats -> what is logged)
# --------------------------------------------------------------------------------------------


def step_metrics(stage: str, log: dict[str, float], lr: float) -> dict[str, float]:
    """One optimiser step: the loop's floats without a stage prefix, each loss term both as
    computed (``loss/<term>``) and as it enters the total (``loss_weighted/<term>`` = weight x
    term; the ramped weights explain a total that rises while every term falls), plus the
    learning rate and the stage index."""
    out = {"stage": float(STAGE_INDEX[stage]), "lr": float(lr)}
    for key, value in log.items():
        out[key] = value
        if key.startswith("weight/") and f"loss/{key[7:]}" in log:
            out[f"loss_weighted/{key[7:]}"] = value * log[f"loss/{key[7:]}"]
    return out


def epoch_metrics(stage: str, summary: dict[str, float], epoch: int) -> dict[str, float]:
    """The loop's per-epoch summary ('<stage>/epoch_loss', '<stage>/scenes_per_s') as 'epoch/loss',
    'scenes_per_s', plus the epoch number within the stage."""
    out = {"epoch": float(epoch), "stage": float(STAGE_INDEX[stage])}
    for key, value in summary.items():
        key = key.removeprefix(f"{stage}/")
        out[f"epoch/{key[6:]}" if key.startswith("epoch_") else key] = value
    return out


# --------------------------------------------------------------------------------------------
# A run directory's runs: <run_dir>/mlflow.json
# --------------------------------------------------------------------------------------------


def read_record(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stage_run_id(run_dir: str | Path, stage: str) -> str | None:
    """The MLflow run id of one stage of `run_dir` (its mlflow.json), or None."""
    return (read_record(run_dir).get("stage_runs") or {}).get(stage)


def update_record(run_dir: str | Path, **changes: Any) -> dict:
    """Merge `changes` into the run directory's record (atomic write). Dict values merge one level."""
    from rayseg import atomic

    record = read_record(run_dir)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(record.get(key), dict):
            record[key] = {**record[key], **value}
        else:
            record[key] = value
    atomic.write_bytes(Path(run_dir) / RUN_RECORD, json.dumps(record, indent=2).encode())
    return record


def open_pipeline(cfg: cfgmod.Config, run_dir: str | Path, kind: str, parent_run_id: str | None = None,
                  own_run: bool = True, run_name: str | None = None, tags: dict[str, str] | None = None) -> str:
    """The run the stages of `run_dir` hang under, recorded in its mlflow.json (a resumed run
    finds it there). own_run: a new pipeline run (child of `parent_run_id` when given: a Tune
    trial under its sweep). Otherwise the stages hang directly under `parent_run_id` (the demo's
    run, or a trial's). Returns that run's id; a new pipeline run is left RUNNING."""
    record = read_record(run_dir)
    if record.get("pipeline_run_id"):
        if own_run:
            client_for(cfg).update_run(record["pipeline_run_id"], status="RUNNING")
        return record["pipeline_run_id"]
    if own_run:
        tracker = Tracker(cfg, run_name or Path(run_dir).name, parent_run_id=parent_run_id,
                          tags={TAG_PIPELINE: kind, "rayseg.run_dir": str(Path(run_dir).resolve()), **(tags or {})})
        run_id = tracker.run_id
    elif parent_run_id:
        run_id = parent_run_id
    else:
        raise ValueError("open_pipeline: own_run=False needs a parent_run_id")
    update_record(run_dir, tracking_uri=tracking_uri(cfg), pipeline_run_id=run_id, pipeline=kind)
    return run_id


def stage_tracker(cfg: cfgmod.Config, run_dir: str | Path, stage: str, *, enabled: bool = True,
                  parent_run_id: str | None = None, step_offset: int = 0, tags: dict[str, str] | None = None,
                  system_metrics: bool = True, create: bool = True) -> Tracker:
    """The run of one stage of `run_dir`: reattached if its mlflow.json names one (a resumed
    stage), else a new child of the pipeline run (the record's, else `parent_run_id`). With
    create=False (nothing left to run in this stage, e.g. a Tune trial branching from a shared
    stage cmg) no new run is made: a disabled tracker."""
    if not enabled:
        return Tracker(cfg, stage, enabled=False)
    existing = stage_run_id(run_dir, stage)
    if existing:
        return Tracker(cfg, stage, run_id=existing, system_metrics=system_metrics)
    if not create:
        return Tracker(cfg, stage, enabled=False)
    parent = read_record(run_dir).get("pipeline_run_id") or parent_run_id
    tracker = Tracker(cfg, stage, parent_run_id=parent, step_offset=step_offset, system_metrics=system_metrics,
                      dataset_context="infer" if stage == "pseudo_label" else "train",
                      tags={TAG_STAGE: stage, "rayseg.run_dir": str(Path(run_dir).resolve()), **(tags or {})})
    update_record(run_dir, stage_runs={stage: tracker.run_id})
    return tracker


def end_run(cfg: cfgmod.Config, run_id: str, status: str = "FINISHED") -> None:
    client_for(cfg).set_terminated(run_id, status=status)


def log_summary(cfg: cfgmod.Config, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Summary metrics (final pseudo-label / val mIoU) on a pipeline run, at `step`."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client_for(cfg).log_batch(run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])
