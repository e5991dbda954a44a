"""`rayseg tune`: an experiment file's [grid] as a Ray Tune sweep.

One trial per grid point (config.grid_points: the product of the list keys, times the explicit
``[[grid.rows]]``). A trial is a plain function (the Ray Train V2 pattern) that applies its point
to the config and runs, in its own trial directory:

1. stages cmg -> cmg_rpc in a TorchTrainer (`launch.fit`) with at least one Ray Train worker
   (Train's local mode, ``ray.num_workers = 0``, would run the loop inside the trial's Tune
   session, where Ray refuses the ray.train API); per-epoch metrics reach Tune through
   TuneReportCallback, so ASHA can stop a trial between epochs;
2. pseudo-labels of the train split from the EMA teacher (`pseudo.make_pseudo_labels`) and their
   mIoU against GT, 3D and 2D (evaluation only);
3. optionally (``tune.with_seg``) stage seg on those pseudo-labels and its val mIoU.

Everything a sweep needs is checked before Ray starts a trial: every grid point validates
(config.apply), the dataset exists, every region column the grid names has been computed, every
point's view count is stored, and the 2D initialisations load.

Layout: ``<runs_dir>/<sweep name>/`` holds ``sweep.json`` (the resolved config, the points, the
MLflow parent run id), ``tune/`` (Ray Tune's experiment state, what ``--resume`` restores) and
``trials/<tNNN-...>/`` (one run directory per trial: config.toml, checkpoints, pseudo-labels,
``result.json`` once the trial is complete). A complete trial is never redone: a restored or
retried trial that finds its result.json reports it again and returns; one interrupted mid-way
resumes from its newest checkpoint.

MLflow: one parent run per sweep (tags rayseg.sweep, rayseg.grid_keys, rayseg.file; one param per
point, ``trial/NNN``), one child run per trial (tags rayseg.trial_index / rayseg.grid_point; its
params are the trial's full config, grid point included; the final pseudo-label / val mIoU that
`rayseg report` tabulates), and under each trial its stage runs (cmg, cmg_rpc, pseudo_label,
seg), as for `rayseg train` (rayseg.train.tracking). The trial's run is recorded in its
directory's mlflow.json, so a retried or resumed trial logs into the same runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayseg import config as cfgmod
from rayseg.train.stages import flat_settings, stage1_key

SWEEP_FILE = "sweep.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
RESULT_FILE = "result.json"
STAGE1_DIR = "stage1"
STAGE1_DONE = "complete.json"

# Settings of the whole sweep (resources, tracking, Tune itself): never a per-trial grid value.
SWEEP_LEVEL_SECTIONS = ("tune.", "tracking.", "ray.")
# MLflow tags of sweep runs.
TAG_SWEEP = "rayseg.sweep"
TAG_ROLE = "rayseg.sweep_role"
TAG_GRID_KEYS = "rayseg.grid_keys"
TAG_TRIAL = "rayseg.trial_index"
TAG_POINT = "rayseg.grid_point"
TAG_SUPERSEDED = "rayseg.superseded"


class SweepError(ValueError):
    """A sweep cannot start: bad grid, missing data, missing region columns or weights."""


@dataclass
class Sweep:
    """A validated sweep, ready to run (nothing has started yet)."""

    name: str
    file: str
    experiment: cfgmod.Experiment
    points: list[dict[str, Any]]
    sweep_dir: Path
    resume: bool

    @property
    def config(self) -> cfgmod.Config:
        return self.experiment.config

    @property
    def grid_keys(self) -> list[str]:
        """Every key some point sets, in first-seen order."""
        return list(dict.fromkeys(k for p in self.points for k in p))


# --------------------------------------------------------------------------------------------
# Before Ray: resolve the sweep and check everything it needs
# --------------------------------------------------------------------------------------------


def trial_dir_name(index: int, point: dict[str, Any]) -> str:
    """'t003-0.8-region-adaptive': the trial's index and values (also its MLflow run name)."""
    values = "-".join(Path(v).stem if isinstance(v, str) and "/" in v else str(v) for v in point.values())
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", values).strip("-")[:60]
    return f"t{index:03d}" + (f"-{slug}" if slug else "")


def _sweep_dirs(runs_dir: Path, config_name: str) -> list[Path]:
    """Sweeps of the config named `config_name` under runs_dir, oldest first."""
    found = []
    for path in runs_dir.glob(f"*/{SWEEP_FILE}") if runs_dir.is_dir() else []:
        try:
            if json.loads(path.read_text())["config"].get("name") == config_name:
                found.append(path)
        except (OSError, ValueError, KeyError, AttributeError):
            continue  # not a sweep of ours
    return [p.parent for p in sorted(found, key=lambda p: p.stat().st_mtime)]


def prepare_sweep(path: str | Path, overrides: list[str] = (), name: str | None = None,
                  resume: bool = False) -> Sweep:
    """Load and check a sweep; raises ConfigError / SweepError before anything runs.

    New sweep: `name` defaults to '<config name>-sweep-<time>-<hex>'. Resume: the named sweep,
    or the newest sweep of this config under runs_dir; its stored config and points are used."""
    exp = cfgmod.load(path, list(overrides))  # every grid point is validated here (config.apply)
    runs_dir = Path(exp.config.tracking.runs_dir).resolve()
    if name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SweepError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    if resume:
        # where to look is the one setting a resume may be given: a sweep started with
        # `--set tracking.runs_dir=DIR` is found only there
        changed = [o for o in overrides if o.split("=", 1)[0].strip() != "tracking.runs_dir"]
        if changed:
            raise SweepError(f"--resume continues a sweep exactly as it was started; drop the --set overrides "
                             f"{changed} (only tracking.runs_dir, where the sweep is, may be given)")
        if name is not None:
            sweep_dir = runs_dir / name
        else:
            candidates = _sweep_dirs(runs_dir, exp.config.name)
            if not candidates:
                raise SweepError(f"--resume: no sweep of {exp.config.name!r} under {runs_dir} (start one without --resume)")
            sweep_dir = candidates[-1]
        if not (sweep_dir / SWEEP_FILE).is_file():
            raise SweepError(f"--resume: {sweep_dir} is not a rayseg sweep (no {SWEEP_FILE})")
        stored = json.loads((sweep_dir / SWEEP_FILE).read_text())
        exp = cfgmod.Experiment(config=cfgmod.build(stored["config"]), grid=stored["grid"],
                                path=stored["file"])
        points = stored["points"]
        sweep_name = stored["name"]
    else:
        if not exp.grid:
            raise SweepError(f"{path}: no [grid] table, nothing to sweep (use `rayseg train` for one run)")
        sweep_name = name or f"{exp.config.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        sweep_dir = runs_dir / sweep_name
        if sweep_dir.exists():
            raise SweepError(f"sweep directory {sweep_dir} already exists: pass --resume to continue it, "
                             f"or another --name")
        points = [cfgmod.absolute_paths(p) for p in cfgmod.grid_points(exp)]
        base = flat_settings(exp.config)
        exp = cfgmod.Experiment(config=cfgmod.build(base, exp.sources), grid=exp.grid, sources=exp.sources,
                                path=exp.path)
    sweep = Sweep(name=sweep_name, file=str(Path(exp.path).resolve()) if exp.path else "", experiment=exp,
                  points=points, sweep_dir=sweep_dir, resume=resume)
    check_sweep(sweep)
    return sweep


def trial_configs(sweep: Sweep) -> list[cfgmod.Config]:
    return [cfgmod.apply(sweep.experiment, p, source=f"{sweep.file} [grid]") for p in sweep.points]


def check_sweep(sweep: Sweep) -> None:
    """Every problem the sweep would hit in a trial, found now and reported together."""
    problems: list[str] = []
    file = sweep.file or "the experiment"
    for key in sweep.grid_keys:
        if key.startswith(SWEEP_LEVEL_SECTIONS):
            problems.append(f"grid key {key} (in {file}): [{key.split('.')[0]}] settings apply to the whole "
                            f"sweep and cannot vary per trial")
    cfgs = trial_configs(sweep)
    problems += _check_metrics(sweep, cfgs)
    problems += _check_datasets(sweep, cfgs)
    problems += _check_models(sweep, cfgs)
    if problems:
        raise SweepError(f"sweep {sweep.name} ({file}) cannot start:\n  - " + "\n  - ".join(problems))


def _point_text(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in point.items()) or "(base config)"


def _check_metrics(sweep: Sweep, cfgs: list[cfgmod.Config]) -> list[str]:
    t = sweep.config.tune
    problems = []
    if t.metric == "val_miou_3d" and not t.with_seg:
        problems.append("tune.metric = 'val_miou_3d' needs tune.with_seg = true")
    for point, cfg in zip(sweep.points, cfgs):
        where = _point_text(point)
        if cfg.optim.cmg_epochs + cfg.optim.cmg_rpc_epochs == 0:
            problems.append(f"grid point {where}: optim.cmg_epochs and optim.cmg_rpc_epochs are both 0")
        if t.with_seg and cfg.optim.seg_epochs == 0:
            problems.append(f"grid point {where}: tune.with_seg needs optim.seg_epochs > 0")
        if t.metric in cfgmod.TUNE_EPOCH_METRICS and cfg.data.monitor_scenes == 0:
            problems.append(f"grid point {where}: tune.metric = {t.metric!r} is reported by the monitor, "
                            f"but data.monitor_scenes = 0")
        if t.metric in cfgmod.TUNE_EPOCH_METRICS and cfg.data.monitor_every != 1:
            problems.append(f"grid point {where}: tune.metric = {t.metric!r} is reported by the monitor every "
                            f"epoch for ASHA, but data.monitor_every = {cfg.data.monitor_every}; set it to 1")
        if t.metric.endswith("_2d") and cfg.data.num_views == 0:
            problems.append(f"grid point {where}: tune.metric = {t.metric!r} needs views (data.num_views = 0); "
                            f"use a 3D metric")
    return problems


def _check_datasets(sweep: Sweep, cfgs: list[cfgmod.Config]) -> list[str]:
    from rayseg.data import pipeline, shards
    from rayseg.data.scene import SceneError

    problems = []
    by_root: dict[str, list[tuple[dict, cfgmod.Config]]] = {}
    for point, cfg in zip(sweep.points, cfgs):
        by_root.setdefault(cfg.data.root, []).append((point, cfg))
    for root, members in by_root.items():
        try:
            manifest = shards.load_manifest(root)
        except (FileNotFoundError, NotADirectoryError, shards.ShardError) as exc:
            problems.append(f"data.root {root}: {exc}. Prepare it first, e.g. "
                            f"`rayseg prepare synthetic {sweep.file} --out {root}`")
            continue
        splits = {cfg.data.train_split for _, cfg in members}
        if sweep.config.tune.with_seg:
            splits |= {cfg.data.val_split for _, cfg in members}
        entries = [e for e in manifest["scenes"] if e["split"] in splits]
        try:  # missing / truncated / foreign shards, named now rather than by Ray Data in a trial
            shards.check_listed_files(root, entries, manifest)
        except (FileNotFoundError, shards.ShardError) as exc:
            problems.append(str(exc))
        # Region columns: all missing ones in one message, with the command that computes them.
        needed = list(dict.fromkeys(cfg.data.region_column for _, cfg in members if cfg.data.region_column))
        missing = [m for m in needed if not entries or any(m not in e.get("regions", []) for e in entries)]
        if not missing and needed:  # present everywhere, but all made with the recorded parameters?
            from rayseg.partition.job import verify_partitions

            mixed = verify_partitions(root, needed, coverage=False)
            if mixed:
                problems.append(f"dataset {root}: region columns the grid needs are inconsistent:\n      "
                                + "\n      ".join(mixed[:5]) + (" ..." if len(mixed) > 5 else ""))
        if missing:
            methods = " ".join(f"--method {m}" for m in missing)
            problems.append(f"dataset {root} lacks region column(s) {missing} that the grid needs "
                            f"(data.region_column); compute them first:\n      rayseg partition {root} {methods}"
                            + (f" --config {sweep.file}" if sweep.file else ""))
        # Views: sampling silently takes fewer views than asked when a scene stores fewer.
        for split, num_views in dict.fromkeys((cfg.data.train_split, cfg.data.num_views) for _, cfg in members):
            train = [e for e in manifest["scenes"] if e["split"] == split]
            if not num_views or not train:
                continue
            fewest = min(train, key=lambda e: e.get("num_views") or 0)
            if (fewest.get("num_views") or 0) < num_views:
                problems.append(f"data.num_views = {num_views} but scene {fewest['scene_id']} of {root} "
                                f"stores only {fewest.get('num_views') or 0} views; prepare the dataset with more "
                                f"views (synthetic.num_views / --views) or drop that grid value")
        # Everything else the data layer checks (splits, columns), once per distinct data setting.
        if not missing:
            seen = set()
            for point, cfg in members:
                key = (cfg.data.train_split, cfg.data.region_column, cfg.data.num_views)
                if key in seen:
                    continue
                seen.add(key)
                try:
                    pipeline.plan(root, cfg.data.train_split, cfg, "train")
                except (FileNotFoundError, pipeline.PipelineError, shards.ShardError, SceneError) as exc:
                    problems.append(f"grid point {_point_text(point)}: {exc}")
    return problems


def _check_models(sweep: Sweep, cfgs: list[cfgmod.Config]) -> list[str]:
    """Build each distinct 2D initialisation once: missing ImageNet weights or checkpoint files
    fail here with the models' own message instead of inside a trial."""
    from rayseg.data import shards
    from rayseg.models.resnet2d import ResNet2D

    problems = []
    seen: set[tuple[str, str]] = set()
    for point, cfg in zip(sweep.points, cfgs):
        if cfg.model.init_3d and not Path(cfg.model.init_3d).is_file():
            problems.append(f"grid point {_point_text(point)}: model.init_3d: file not found: {cfg.model.init_3d}")
        key = (cfg.model.backbone_2d, cfg.model.init_2d)
        if key in seen or cfg.model.init_2d == "none":
            continue
        seen.add(key)
        try:
            num_classes = len(shards.load_manifest(cfg.data.root)["class_names"])
        except (FileNotFoundError, NotADirectoryError, shards.ShardError, KeyError):
            num_classes = 20  # the dataset problem is reported by _check_datasets
        try:
            ResNet2D(cfg.model.backbone_2d, num_classes, init=cfg.model.init_2d)
        except (RuntimeError, FileNotFoundError, ValueError, KeyError) as exc:
            problems.append(f"grid point {_point_text(point)}: model.init_2d = {cfg.model.init_2d!r} "
                            f"({cfg.model.backbone_2d}): {exc}")
    return problems


# --------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------


def trial_workers(cfg: cfgmod.Config) -> cfgmod.Config:
    """A trial's training config: at least one Ray Train worker (see the module docstring)."""
    if cfg.ray.num_workers >= 1:
        return cfg
    return cfgmod.replace(cfg, **{"ray.num_workers": 1})


def trial_resources(cfg: cfgmod.Config, cluster: dict[str, float]) -> dict[str, float]:
    """What Tune reserves for a trial's own process. The trial only drives a TorchTrainer whose
    workers reserve their own CPUs/GPUs (and the pseudo-label actors theirs): a sliver of the
    TRAIN_DRIVER resource (Ray rejects {'CPU': 0} alone)."""
    from rayseg.train.launch import TRAIN_DRIVER_RESOURCE

    if cluster.get(TRAIN_DRIVER_RESOURCE, 0) > 0:
        return {"CPU": 0, TRAIN_DRIVER_RESOURCE: 0.01}
    print(f"[rayseg] the cluster declares no {TRAIN_DRIVER_RESOURCE} resource (see cluster/): trial drivers "
          f"reserve 0.01 CPU instead", flush=True)
    return {"CPU": 0.01}


def max_concurrent_trials(cfg: cfgmod.Config, cluster: dict[str, float], num_points: int) -> int:
    """tune.max_concurrent, or (when 0) as many trials as the cluster's CPUs and GPUs hold: each
    trial's workers (at least one), keeping one CPU free for Ray
    Data and the pseudo-label actors."""
    if cfg.tune.max_concurrent:
        return min(cfg.tune.max_concurrent, num_points)
    workers = max(1, cfg.ray.num_workers)
    cpus = cluster.get("CPU", 0.0)
    by_cpu = math.floor((cpus - (1 if cpus > 1 else 0)) / (workers * cfg.ray.cpus_per_worker) + 1e-9)
    n = max(1, by_cpu)
    if cfg.ray.use_gpu:
        gpus = cluster.get("GPU", 0.0)
        if gpus < workers:
            print(f"[rayseg] the cluster has {gpus:g} GPU(s) now (autoscaling?): one trial at a time; "
                  f"set tune.max_concurrent to run more", flush=True)
            n = 1
        else:
            n = min(n, math.floor(gpus / workers))
    return max(1, min(n, num_points))


# --------------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _mlflow_client(cfg: cfgmod.Config):
    import mlflow

    from rayseg.train.tracking import tracking_uri

    return mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))


def _supersede_stale_runs(cfg: cfgmod.Config, parent_run_id: str, run_name: str, keep: str | None) -> None:
    """Child runs of this trial left behind by an interrupted attempt that never checkpointed
    (a fresh attempt makes a new one): tagged superseded and marked KILLED, so each trial has
    exactly one live child run."""
    client = _mlflow_client(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                                                 f"and tags.mlflow.runName = '{run_name}'")
    for run in runs:
        if run.info.run_id != keep and run.data.tags.get(TAG_SUPERSEDED) != "true":
            client.set_tag(run.info.run_id, TAG_SUPERSEDED, "true")
            client.set_terminated(run.info.run_id, status="KILLED")


def run_trial(config: dict, sweep: dict) -> None:
    """Tune trial function. config["trial"]: {"index", "point"}; sweep: {"config" (flat), "file",
    "sweep_dir", "parent_run_id", "grid", "name"}."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayseg.train import launch, tracking
    from rayseg.train.checkpoint import latest_checkpoint

    trial = config["trial"]
    exp = cfgmod.Experiment(config=cfgmod.build(sweep["config"]), grid=sweep["grid"], path=sweep["file"])
    cfg = trial_workers(cfgmod.apply(exp, trial["point"], source=f"{sweep['file']} [grid]"))
    trial_dir = Path(sweep["sweep_dir"]) / TRIALS_DIR / trial_dir_name(trial["index"], trial["point"])
    result_file = trial_dir / RESULT_FILE
    if result_file.is_file():  # complete in an earlier attempt: report it again, redo nothing
        print(f"[rayseg] trial {trial_dir.name} already complete ({result_file})", flush=True)
        tune.report(json.loads(result_file.read_text())["metrics"])
        return
    if not (trial_dir / launch.RUN_CONFIG_FILE).is_file():
        _write_atomic(trial_dir / launch.RUN_CONFIG_FILE, cfgmod.dumps(cfg))

    # The trial's MLflow run (child of the sweep; reused by a retried or resumed trial).
    tags = {TAG_SWEEP: sweep["name"], TAG_TRIAL: str(trial["index"]), TAG_POINT: json.dumps(trial["point"])}
    child_run = tracking.open_pipeline(cfg, trial_dir, "trial", parent_run_id=sweep["parent_run_id"],
                                       run_name=trial_dir.name, tags=tags)
    _supersede_stale_runs(cfg, sweep["parent_run_id"], trial_dir.name, keep=child_run)
    try:
        # 1. stages cmg -> cmg_rpc (resumes from the trial's newest checkpoint after an interruption)
        stages = [s for s, n in (("cmg", cfg.optim.cmg_epochs), ("cmg_rpc", cfg.optim.cmg_rpc_epochs)) if n]
        t0 = time.time()
        shared = branch_from_shared_stage1(cfg, Path(sweep["sweep_dir"]), trial_dir, child_run)
        if shared is not None:  # the trial's stage cmg is the shared run's (under the trial that trained it)
            stage1_run = tracking.stage_run_id(shared, "cmg")
            if stage1_run:
                tracking.client_for(cfg).set_tag(child_run, launch.TAG_STAGE1_RUN, stage1_run)
        launch.fit(cfg, trial_dir, stages, parent_run_id=child_run, callbacks=[TuneReportCallback()])
        t_train = time.time() - t0
        progress = _load_state(latest_checkpoint(trial_dir))["progress"]
        history = [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in progress["history"]]
        launch.log_run_model(cfg, trial_dir, "teacher")

        # 2. pseudo-labels of the train split and their mIoU vs GT (evaluation only)
        metrics = finish_trial(cfg, trial_dir, child_run, progress["step"])
    except BaseException:
        tracking.end_run(cfg, child_run, "FAILED")
        raise
    final = {**(history[-1] if history else {}), **metrics}
    final.pop("epoch", None)
    _write_atomic(result_file, json.dumps({"point": trial["point"], "mlflow_run_id": child_run,
                                           "metrics": final}, indent=2))
    print(f"[rayseg] trial {trial_dir.name} complete (training {t_train:.0f} s, pseudo-labels and evaluation "
          f"{time.time() - t0 - t_train:.0f} s): " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
    tune.report(final)


def branch_from_shared_stage1(cfg: cfgmod.Config, sweep_dir: Path, trial_dir: Path,
                              parent_run_id: str | None) -> Path | None:
    """Give a fresh trial stage cmg's last checkpoint from <sweep>/stage1/<key>/ (or
    <tune.stage1_dir>/<key>/, shared across sweeps), training it there first if no trial has
    (one trial trains it, the others with the same key wait on a lock file; a killed training
    resumes from its own checkpoints). The trial then resumes
    from that checkpoint straight into stage cmg_rpc. Returns the shared run directory, or None
    when the trial already has checkpoints of its own (a resumed trial) or sharing is off."""
    import fcntl

    from rayseg.train import launch
    from rayseg.train.checkpoint import latest_checkpoint, link_tree

    if not cfg.tune.share_stage1 or cfg.tune.asha or not cfg.optim.cmg_epochs or latest_checkpoint(trial_dir):
        return None
    shared = (Path(cfg.tune.stage1_dir) if cfg.tune.stage1_dir else sweep_dir / STAGE1_DIR) / stage1_key(cfg)
    shared.mkdir(parents=True, exist_ok=True)
    with open(shared.parent / f"{shared.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if this process dies
        done = shared / STAGE1_DONE
        if not done.is_file():
            if not (shared / launch.RUN_CONFIG_FILE).is_file():
                _write_atomic(shared / launch.RUN_CONFIG_FILE, cfgmod.dumps(cfg))
            print(f"[rayseg] training stage cmg once for every trial with its settings: {shared}", flush=True)
            launch.fit(cfg, shared, ["cmg"], parent_run_id=parent_run_id)
            _write_atomic(done, json.dumps({"checkpoint": latest_checkpoint(shared).parent.name,
                                            "trained_for": trial_dir.name}))
        else:
            print(f"[rayseg] trial {trial_dir.name} branches from the shared stage cmg in {shared}", flush=True)
        name = json.loads(done.read_text())["checkpoint"]
    target = trial_dir / "checkpoints" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        link_tree(shared / "checkpoints" / name, target)
    return shared


def _load_state(path: Path | None) -> dict:
    from rayseg.train.checkpoint import load_state

    return load_state(path, map_location="cpu") if path else {}


def finish_trial(cfg: cfgmod.Config, trial_dir: Path, child_run: str, step: int) -> dict[str, float]:
    """Pseudo-labels + their mIoU (3D over the written labels, 2D from the teacher), and with
    tune.with_seg stage seg + its val mIoU. Stage runs pseudo_label (and seg) under the trial's run
    `child_run`, which gets the final numbers (what `rayseg report` reads) and is ended here.
    Returns Tune metrics."""
    import ray

    from rayseg import metrics as M
    from rayseg.data import shards
    from rayseg.train import launch
    from rayseg.train.tracking import Tracker

    names = tuple(shards.load_manifest(cfg.data.root)["class_names"])
    conf2_ref = None
    if cfg.data.num_views:  # runs beside the pseudo-label job, with its own resources (outside the
        # trial's placement group, which holds only the driver's sliver)
        task = ray.remote(launch.teacher_2d_confusion).options(num_cpus=cfg.ray.cpus_per_worker,
                                                        num_gpus=1 if cfg.ray.use_gpu else 0,
                                                        scheduling_strategy="DEFAULT")
        conf2_ref = task.remote(str(trial_dir))
    pl_dir = trial_dir / "pseudo_labels"
    pl = launch.pseudo_label(trial_dir, pl_dir, parent_run_id=child_run,  # resumable: labelled scenes are kept
                             evaluate_2d=False)  # the task above does it, beside the labelling
    conf3 = pl["conf"]
    tracker = Tracker(cfg, trial_dir.name, run_id=child_run)
    out = {"pseudo_final_miou_3d": tracker.log_confusion(conf3, names, "pseudo_final_3d", step)["pseudo_final_3d_miou"]}
    if conf2_ref is not None:
        conf2 = ray.get(conf2_ref)
        stage_run = Tracker(cfg, "pseudo_label", run_id=pl["run_id"])
        stage_run.log_confusion(conf2, names, "pseudo_final_2d", 0)
        stage_run.end()
        out["pseudo_final_miou_2d"] = tracker.log_confusion(conf2, names, "pseudo_final_2d", step)["pseudo_final_2d_miou"]
    if cfg.tune.with_seg:
        from rayseg.evaluate import evaluate_run
        from rayseg.train.checkpoint import latest_checkpoint

        seg_cfg = cfgmod.replace(cfg, **{"data.pseudo_labels": str(pl_dir)})
        seg_dir = trial_dir / f"seg-{trial_dir.name}"  # the directory names the MLflow run
        if not (seg_dir / launch.RUN_CONFIG_FILE).is_file():
            _write_atomic(seg_dir / launch.RUN_CONFIG_FILE, cfgmod.dumps(seg_cfg))
        # stage seg: a grandchild run of the sweep, its steps after the teacher's
        launch.fit(seg_cfg, seg_dir, ["seg"], parent_run_id=child_run, step_offset=step)
        result = evaluate_run(seg_dir, cfg.data.val_split)
        print(result["tables"], flush=True)
        seg_steps = launch.checkpoint_step(latest_checkpoint(seg_dir))
        out["val_miou_3d"] = tracker.log_confusion(result["3d"], names, "val_3d", step + seg_steps)["val_3d_miou"]
    tracker.end()
    print(M.iou_table(conf3, names, title=f"{trial_dir.name}: pseudo-labels vs GT, train split (evaluation only)"),
          flush=True)
    return out


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def _start_parent_run(sweep: Sweep) -> str:
    """The sweep's MLflow parent run: tags name the sweep, its grid keys and file; one param per
    grid point (trial/NNN = the point as JSON), the base config as params."""
    from mlflow.entities import Param

    from rayseg.train.tracking import experiment_id, source_tags

    cfg = sweep.config
    client = _mlflow_client(cfg)
    exp_id = experiment_id(client, cfg)  # created if missing, tagged for the model-training view
    run = client.create_run(exp_id, run_name=sweep.name, tags={
        **source_tags(), "mlflow.runName": sweep.name, TAG_SWEEP: sweep.name, TAG_ROLE: "parent",
        TAG_GRID_KEYS: json.dumps(sweep.grid_keys), "rayseg.file": sweep.file,
        "rayseg.sweep_dir": str(sweep.sweep_dir), "rayseg.trials": str(len(sweep.points))})
    params = [Param(f"trial/{i:03d}", json.dumps(p)[:6000]) for i, p in enumerate(sweep.points)]
    params += [Param(k, str(v)[:6000]) for k, v in cfgmod.flatten(cfgmod.to_dict(cfg)).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    client.log_text(run.info.run_id, cfgmod.dumps(cfg), "config.toml")
    return run.info.run_id


def run_sweep(sweep: Sweep) -> dict:
    """Run (or resume) a checked sweep. Returns {"sweep_dir", "parent_run_id", "results": [...],
    "errors": n}; each result: {"index", "point", "metrics"} from Tune."""
    import ray
    from ray import tune

    from rayseg.train import launch

    cfg = sweep.config
    launch.quiet_environment()
    if sweep.resume:
        stored = json.loads((sweep.sweep_dir / SWEEP_FILE).read_text())
        parent_run_id = stored["parent_run_id"]
        _mlflow_client(cfg).update_run(parent_run_id, status="RUNNING")
    else:
        sweep.sweep_dir.mkdir(parents=True)
        parent_run_id = _start_parent_run(sweep)
        _write_atomic(sweep.sweep_dir / SWEEP_FILE, json.dumps({
            "name": sweep.name, "file": sweep.file, "config": cfgmod.flatten(cfgmod.to_dict(cfg)),
            "grid": sweep.experiment.grid, "points": sweep.points, "parent_run_id": parent_run_id,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))

    launch.init_ray(cfg)
    cluster = ray.cluster_resources()
    resources = trial_resources(cfg, cluster)
    concurrent = max_concurrent_trials(cfg, cluster, len(sweep.points))
    context = {"config": cfgmod.flatten(cfgmod.to_dict(cfg)), "file": sweep.file, "grid": sweep.experiment.grid,
               "sweep_dir": str(sweep.sweep_dir), "parent_run_id": parent_run_id, "name": sweep.name}
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=context), resources)
    print(f"[rayseg] sweep {sweep.name}: {len(sweep.points)} trials, up to {concurrent} at a time, "
          f"{resources} per trial driver, in {sweep.sweep_dir}", flush=True)
    tune_path = sweep.sweep_dir / TUNE_DIR
    if sweep.resume and tune.Tuner.can_restore(str(tune_path)):
        tuner = tune.Tuner.restore(str(tune_path), trainable=trainable, resume_errored=True)
    else:
        scheduler = None
        if cfg.tune.asha:
            from ray.tune.schedulers import ASHAScheduler

            epochs = cfg.optim.cmg_epochs + cfg.optim.cmg_rpc_epochs
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1,
                                      grace_period=cfg.tune.asha_grace_epochs,
                                      reduction_factor=cfg.tune.asha_reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([{"index": i, "point": p} for i, p in enumerate(sweep.points)])},
            tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode="max", max_concurrent_trials=concurrent,
                                        scheduler=scheduler),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep.sweep_dir),
                                      failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                                      verbose=1))
    client = _mlflow_client(cfg)
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl+C: Tune gave up stopping gracefully
        client.set_tag(parent_run_id, "rayseg.unfinished_trials", "unknown (interrupted)")
        client.set_terminated(parent_run_id, status="KILLED")
        raise
    except BaseException:
        client.set_terminated(parent_run_id, status="FAILED")
        raise
    results = trial_outcomes(sweep, grid)
    errors = sum(1 for r in results if r["status"] == "error")
    unfinished = sum(1 for r in results if r["status"] == "unfinished")
    _close_unfinished_children(client, parent_run_id)
    for status in ("complete", "stopped", "error", "unfinished"):
        client.set_tag(parent_run_id, f"rayseg.{status}_trials" if status != "error" else "rayseg.failed_trials",
                       str(sum(1 for r in results if r["status"] == status)))
    # A sweep with a failed trial is FAILED; one stopped before every trial ended (Ctrl+C, a lost
    # driver) is KILLED: neither reads as a finished sweep whose table is complete.
    client.set_terminated(parent_run_id, status="FAILED" if errors else "KILLED" if unfinished else "FINISHED")
    print(format_results(sweep, results), flush=True)
    return {"sweep_dir": sweep.sweep_dir, "parent_run_id": parent_run_id, "results": results, "errors": errors,
            "unfinished": unfinished}


def trial_outcomes(sweep: Sweep, grid) -> list[dict]:
    """One entry per grid point, in index order: {"index", "point", "metrics", "error", "status"}
    with status 'complete' (its result.json exists: the trial's own proof of completion),
    'error' (failed for good), 'stopped' (ended early by the ASHA scheduler, a normal outcome),
    or 'unfinished' (interrupted, or never started: Tune creates grid trials lazily, so an
    interrupted sweep's result grid may hold fewer trials than the grid has points)."""
    by_index: dict[int, dict] = {}
    for r in grid:
        trial = (r.config or {}).get("trial", {})
        error = [line for line in str(r.error).splitlines() if line.strip()][-1] if r.error else None
        by_index[trial.get("index")] = {"metrics": dict(r.metrics or {}), "error": error}
    # Tune's own trial states (TERMINATED = ended normally, by completion or by the scheduler);
    # the ResultGrid has no public per-trial status.
    analysis = getattr(grid, "_experiment_analysis", None)
    terminated = {(t.config or {}).get("trial", {}).get("index") for t in getattr(analysis, "trials", [])
                  if t.status == "TERMINATED"}
    out = []
    for index, point in enumerate(sweep.points):
        r = by_index.get(index, {"metrics": {}, "error": None})
        done = (sweep.sweep_dir / TRIALS_DIR / trial_dir_name(index, point) / RESULT_FILE).is_file()
        if done:
            status = "complete"
        elif r["error"]:
            status = "error"
        elif sweep.config.tune.asha and index in terminated:
            status = "stopped"
        else:
            status = "unfinished"
        out.append({"index": index, "point": point, **r, "status": status})
    return out


def _close_unfinished_children(client, parent_run_id: str) -> None:
    """Trial runs (and their stage runs) still RUNNING when the sweep ends belong to trials that
    ASHA stopped or that failed for good: mark them KILLED (their metrics so far stay)."""
    parent = client.get_run(parent_run_id)
    for run in client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
        if run.data.tags.get(TAG_TRIAL) is not None:
            _close_unfinished_children(client, run.info.run_id)


def format_results(sweep: Sweep, results: list[dict]) -> str:
    """A plain summary of the sweep's trials (the paper-style table is `rayseg report`)."""
    metric_names = [m for m in cfgmod.TUNE_FINAL_METRICS if any(m in r["metrics"] for r in results)]
    counts = {s: sum(1 for r in results if r.get("status") == s) for s in ("complete", "stopped", "error", "unfinished")}
    lines = [f"sweep {sweep.name}: {len(results)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
             + " (pseudo-label mIoU uses GT: evaluation only)"]
    for r in results:
        values = " ".join(f"{m}={100 * r['metrics'][m]:.1f}" for m in metric_names if m in r["metrics"])
        status = r.get("status", "")
        lines.append(f"  t{r['index']:03d} {_point_text(r['point'] or {})}: {values or 'no result'}"
                     + (f"  ERROR {r['error'][:200]}" if r["error"] else "")
                     + ("  UNFINISHED" if status == "unfinished" else "  stopped by ASHA" if status == "stopped" else ""))
    if counts["unfinished"]:
        lines.append(f"{counts['unfinished']} trial(s) unfinished: the sweep was interrupted; continue it with "
                     f"`rayseg tune {sweep.file or 'FILE'} --resume --name {sweep.name} "
                     f"--set tracking.runs_dir={sweep.sweep_dir.parent}`")
    exp_name = sweep.config.tracking.experiment
    lines.append(f"table: rayseg report --experiment {exp_name}")
    return "\n".join(lines)
