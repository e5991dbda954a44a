"""Driver side of training: Ray start-up, run directories, and the TorchTrainer around
`rayseg.train.loop.train_func`.

A run directory (``<runs_dir>/<run name>/``) holds the resolved config, the checkpoints the
loop writes every epoch, Ray Train's own storage, and later the pseudo-labels. Resuming a run
(`--resume RUN_DIR`) continues from its newest checkpoint, in the same MLflow runs.

MLflow (rayseg.train.tracking): `train`, `segment` and `pseudo_label` each open a pipeline run
(or, given `parent_run_id`, hang their stage runs under that run: the demo's, a Tune trial's),
recorded in the run directory's mlflow.json; at the end the EMA teacher / the segmenter is logged
as an MLflow model (rayseg.predict.PointSegmenter) output of the last stage run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path

from rayseg import config as cfgmod
from rayseg.data import shards

RUN_CONFIG_FILE = "config.toml"
TRAIN_DRIVER_RESOURCE = "TRAIN_DRIVER"


def quiet_environment() -> None:
    """Offline hygiene and small-machine settings (ENVIRONMENT.md), before Ray starts."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray Train's workers otherwise route print() to a logger that echoes it to the console, and
    # also print it themselves when stdout is wrapped (it is): every line of a worker came twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def init_ray(cfg: cfgmod.Config) -> None:
    """Join cfg.ray.address (or RAY_ADDRESS), else start an embedded local Ray. The local head
    declares a small TRAIN_DRIVER resource so Tune trial drivers can be scheduled with 0 CPUs."""
    import ray

    quiet_environment()
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {k: os.environ[k] for k in ("RAY_USAGE_STATS_ENABLED", "MLFLOW_DISABLE_TELEMETRY",
                                                   "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS",
                                                   "RAY_TRAIN_ENABLE_PRINT_PATCH") if k in os.environ}}
    if address:
        # On a cluster the job's runtime env (cluster/runtime_env.yaml) carries these variables;
        # passing our own here would make Ray refuse to merge the two.
        ray.init(address=address, log_to_driver=True)
    else:
        from rayseg.raylocal import init_local

        init_local(resources={TRAIN_DRIVER_RESOURCE: 100}, runtime_env=env, log_to_driver=True)  # on 127.0.0.1


def check_dataset(cfg: cfgmod.Config) -> dict:
    """Fail before Ray starts if the dataset is missing, naming the path."""
    root = Path(cfg.data.root)
    if not root.exists():
        raise FileNotFoundError(f"data.root {root} does not exist (prepare it with `rayseg prepare ...`)")
    return shards.load_manifest(root)


def new_run_dir(cfg: cfgmod.Config, kind: str) -> Path:
    """A fresh, uniquely named run directory (Ray silently resumes a reused name)."""
    name = f"{cfg.name}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = Path(cfg.tracking.runs_dir).resolve() / name
    run_dir.mkdir(parents=True)
    (run_dir / RUN_CONFIG_FILE).write_text(cfgmod.dumps(cfg))
    return run_dir


def load_run(run_dir: str | Path) -> cfgmod.Config:
    run_dir = Path(run_dir)
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a rayseg run directory (no {RUN_CONFIG_FILE})")
    return cfgmod.load(path).config


def load_run_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[cfgmod.Config, Path, dict]:
    """What a reader of a trained run starts from: its config, the checkpoint it reads
    (`checkpoint`, default the run's newest; checkpoint.run_checkpoint) and that checkpoint's state."""
    from rayseg.train.checkpoint import load_state, run_checkpoint

    cfg = load_run(run_dir)
    ckpt = run_checkpoint(run_dir, checkpoint)
    return cfg, ckpt, load_state(ckpt)


def fit(cfg: cfgmod.Config, run_dir: Path, stages: list[str], parent_run_id: str | None = None,
        callbacks: list | None = None, step_offset: int = 0) -> dict:
    """Run the stages in a TorchTrainer (num_workers 0 = Ray Train local mode, same process).
    `callbacks` go to the trainer's RunConfig (e.g. Tune's TuneReportCallback inside a trial).
    Stage runs hang under `parent_run_id` (unless run_dir's mlflow.json names a pipeline run);
    their steps start after `step_offset` (the pipeline's steps so far). Returns the last
    reported metrics."""
    from rayseg.partition import is_oracle

    if stages != ["seg"] and is_oracle(cfg.data.region_column):
        print(f"[rayseg] WARNING: data.region_column = {cfg.data.region_column!r} is the ground-truth "
              f"ORACLE partition (Table 4's GT row); this run is tagged rayseg.oracle=true and is not an "
              f"unsupervised result.", flush=True)
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayseg.train.loop import train_func

    init_ray(cfg)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": cfgmod.flatten(cfgmod.to_dict(cfg)), "run_dir": str(run_dir),
                           "stages": stages, "run_name": run_dir.name, "parent_run_id": parent_run_id,
                           "step_offset": int(step_offset)},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"{run_dir.name}-{'-'.join(stages)}-{uuid.uuid4().hex[:6]}",
            storage_path=str(run_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.tracking.keep_checkpoints or None),
            # rayseg prints its own progress: not Ray Train's INFO lines, which under `rayseg tune`
            # echo every report's whole metrics dict ("Reporting training result ...")
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks or [])),
    )
    result = trainer.fit()
    return dict(result.metrics or {})


def train(cfg: cfgmod.Config, resume: str | None = None, parent_run_id: str | None = None,
          branch_from: str | None = None) -> Path:
    """Stages cmg -> cmg_rpc as one experiment, then the EMA teacher as an MLflow model.
    MLflow: a 'train' pipeline run with the stages as children, or the stages directly under
    `parent_run_id`. `branch_from`: a train run directory (start at stage cmg_rpc from that
    run's finished stage cmg, branch_run) or one of its checkpoints (start at stage cmg_rpc from
    that checkpoint, settings free, continue_run). Returns the run directory."""
    from rayseg.train.checkpoint import names_checkpoint

    check_dataset(cfg)
    tags = None
    if branch_from and names_checkpoint(branch_from):
        run_dir, tags = continue_run(cfg, branch_from)
    elif branch_from:
        run_dir, tags = branch_run(cfg, branch_from)
    else:
        run_dir = Path(resume).resolve() if resume else new_run_dir(cfg, "train")
    if resume:
        cfg = load_run(run_dir)
    stages = [s for s, epochs in (("cmg", cfg.optim.cmg_epochs), ("cmg_rpc", cfg.optim.cmg_rpc_epochs)) if epochs]
    if not stages:
        raise cfgmod.ConfigError("optim.cmg_epochs and optim.cmg_rpc_epochs are both 0: nothing to train")
    with pipeline_run(cfg, run_dir, "train", parent_run_id, tags=tags) as pipeline:
        fit(cfg, run_dir, stages, parent_run_id=pipeline)
        log_run_model(cfg, run_dir, "teacher")
    return run_dir


BRANCH_FILE = "branched_from.json"
TAG_BRANCHED_FROM = "rayseg.branched_from"  # the checkpoint a branched run started from
TAG_STAGE1_RUN = "rayseg.stage1_run"  # its stage cmg's MLflow run (the source run's, or a shared one)
TAG_CONTINUED_FROM = "rayseg.continued_from"  # the checkpoint a continued run started from
TAG_SETTINGS_DIFFER = "rayseg.settings_differ_from_source"  # the keys a continued run changed


def stage_cmg_checkpoint(run_dir: Path, cfg: cfgmod.Config) -> Path:
    """The checkpoint directory a run wrote at the end of its stage cmg (<step>-cmg-e<epochs>)."""
    from rayseg.train.checkpoint import checkpoints, parse_checkpoint_name

    found = [p.parent for p in checkpoints(run_dir)
             if (parse_checkpoint_name(p.parent.name) or (0, "", 0))[1:] == ("cmg", cfg.optim.cmg_epochs)]
    if not cfg.optim.cmg_epochs or not found:
        have = ", ".join(p.parent.name for p in checkpoints(run_dir)) or "none"
        raise cfgmod.ConfigError(
            f"{run_dir}: no checkpoint at the end of its stage cmg (epoch {cfg.optim.cmg_epochs}; it has: {have}). "
            "Finish that stage first (`rayseg train --resume RUN_DIR`); runs from before rayseg kept "
            "each stage's last checkpoint may have pruned it (tracking.keep_checkpoints).")
    return found[-1]


def branch_run(cfg: cfgmod.Config, source: str | Path) -> tuple[Path, dict[str, str]]:
    """A new train run directory for `cfg` that starts at stage cmg_rpc from `source`'s finished
    stage cmg (its checkpoint hard-linked, not copied): the same as training cfg from scratch
    when every setting that acts in stage cmg is equal (stages.stage1_differences), which is
    checked. Returns (run directory, MLflow tags naming the source)."""
    from rayseg.atomic import write_bytes
    from rayseg.train import tracking
    from rayseg.train.checkpoint import link_tree
    from rayseg.train.stages import stage1_differences

    source = Path(source).resolve()
    source_cfg = load_run(source)
    differ = stage1_differences(cfg, source_cfg)
    if differ:
        listed = "; ".join(f"{k} = {a!r} here, {b!r} in the source" for k, (a, b) in list(differ.items())[:6])
        more = f" (and {len(differ) - 6} more)" if len(differ) > 6 else ""
        raise cfgmod.ConfigError(
            f"--from {source}: its stage cmg was trained with other settings than this config's, so "
            f"branching would not be the run this config describes: {listed}{more}. Only settings that "
            "act after stage cmg (optim.cmg_rpc_*, loss.rpc.enabled_*/beta/eta/threshold/warmup_steps/"
            "teacher_bn/student_classes, optim.seg_*, name, tracking.*, tune.*, Ray resources) may differ. To "
            "continue from it anyway (a chained schedule, the differences recorded), give its checkpoint: "
            f"--from {source / 'checkpoints'}/<step>-cmg-e{source_cfg.optim.cmg_epochs:04d}")
    checkpoint = stage_cmg_checkpoint(source, source_cfg)
    run_dir = new_run_dir(cfg, "train")
    (run_dir / "checkpoints").mkdir()
    link_tree(checkpoint, run_dir / "checkpoints" / checkpoint.name)
    stage1_run = tracking.stage_run_id(source, "cmg")
    record = {"source_run": str(source), "checkpoint": str(checkpoint), "stage1_mlflow_run": stage1_run}
    write_bytes(run_dir / BRANCH_FILE, json.dumps(record, indent=2).encode())
    print(f"[rayseg] {run_dir.name} starts at stage cmg_rpc from {checkpoint}", flush=True)
    tags = {TAG_BRANCHED_FROM: str(checkpoint)}
    if stage1_run:
        tags[TAG_STAGE1_RUN] = stage1_run
    return run_dir, tags


def continue_run(cfg: cfgmod.Config, checkpoint: str | Path) -> tuple[Path, dict[str, str]]:
    """A new train run directory for `cfg` that starts stage cmg_rpc from any stage cmg /
    cmg_rpc checkpoint of another run: a chained schedule (e.g. RPC after a stage cmg continued
    for longer, or stage cmg_rpc with another guidance than the source's stage cmg), which no
    single config describes, so nothing is checked: the settings that differ from the source's
    are recorded (branched_from.json, MLflow tags) instead. The run starts with a fresh optimizer
    at the checkpoint's global step, as a stage cmg_rpc does; its first checkpoint is the source's
    state marked as stage cmg_rpc epoch 0. (Its shuffles and augmentations are those of any stage
    cmg_rpc of this seed: a continuation of a stage cmg_rpc sees the same sequence again.)
    Returns (run directory, MLflow tags)."""
    import torch

    from rayseg.atomic import write_bytes
    from rayseg.train.checkpoint import (CHECKPOINT_FILE, checkpoint_dir_name, checkpoint_file, load_state,
                                         parse_checkpoint_name)
    from rayseg.train.stages import settings_differences

    if not (cfg.optim.cmg_epochs and cfg.optim.cmg_rpc_epochs):
        raise cfgmod.ConfigError("--from CHECKPOINT continues into stage cmg_rpc: optim.cmg_epochs and "
                                 "optim.cmg_rpc_epochs must both be > 0 (stage cmg counts as done)")
    file = checkpoint_file(checkpoint).resolve()
    source = file.parent.parent.parent
    source_cfg = load_run(source)  # names the folder when it is not inside a run directory
    parsed = parse_checkpoint_name(file.parent.name)
    if parsed is None or parsed[1] not in ("cmg", "cmg_rpc"):
        raise cfgmod.ConfigError(f"--from {checkpoint}: not a stage cmg / cmg_rpc checkpoint folder "
                                 "(<run>/checkpoints/<step>-<stage>-e<epoch>); stage seg trains another network")
    state = load_state(file)
    progress = dict(state["progress"], stage_index=1, epoch=0, stage_step=0, mlflow_run_id=None)
    state = {**state, "progress": progress, "best_cmg": None}  # best_cmg is the source's stage-cmg oracle
    differ = settings_differences(cfg, source_cfg)
    run_dir = new_run_dir(cfg, "train")
    start = run_dir / "checkpoints" / checkpoint_dir_name(progress["step"], "cmg_rpc", 0)
    start.mkdir(parents=True)
    torch.save(state, start / CHECKPOINT_FILE)
    record = {"source_run": str(source), "checkpoint": str(file.parent), "continued": True,
              "settings_differ": {k: {"here": a, "source": b} for k, (a, b) in differ.items()}}
    write_bytes(run_dir / BRANCH_FILE, json.dumps(record, indent=2, default=str).encode())
    listed = ", ".join(differ) or "none"
    print(f"[rayseg] {run_dir.name} continues {source.name} at step {progress['step']} ({file.parent.name}) "
          f"into stage cmg_rpc; settings that differ from the source's: {listed}", flush=True)
    return run_dir, {TAG_CONTINUED_FROM: str(file.parent), TAG_SETTINGS_DIFFER: listed[:4000]}


@contextlib.contextmanager
def pipeline_run(cfg: cfgmod.Config, run_dir: Path, kind: str, parent_run_id: str | None,
                 tags: dict[str, str] | None = None):
    """The MLflow pipeline run of `kind` for run_dir (yields its id). Without a parent (a caller
    that owns no run), this run is ours: ended FINISHED, or FAILED when the body raises. `tags`
    go onto a new pipeline run."""
    from rayseg.train import tracking

    own = parent_run_id is None
    pipeline = tracking.open_pipeline(cfg, run_dir, kind, parent_run_id=parent_run_id, own_run=own, tags=tags)
    try:
        yield pipeline
    except BaseException:
        if own:
            tracking.end_run(cfg, pipeline, "FAILED")
        raise
    if own:
        tracking.end_run(cfg, pipeline)


def checkpoint_step(path: str | Path) -> int:
    """The global step of a checkpoint, from its folder name (<step>-<stage>-e<epoch>)."""
    from rayseg.train.checkpoint import parse_checkpoint_name

    parsed = parse_checkpoint_name(Path(path).parent.name)
    return parsed[0] if parsed else 0


def log_run_model(cfg: cfgmod.Config, run_dir: Path, name: str) -> str | None:
    """Log the network of run_dir's newest checkpoint (rayseg.predict.PointSegmenter) as MLflow
    model `name`, output of the run's last stage run, at its last step; registered as
    '<config name>-<name>' with tracking.register_models. Recorded in mlflow.json (not logged
    twice for the same checkpoint). Returns the model URI (None with tracking.log_models off)."""
    from rayseg.predict import log_segmenter, segmenter_from_run
    from rayseg.train import tracking
    from rayseg.train.loop import latest_checkpoint

    if not cfg.tracking.log_models:
        return None
    ckpt = latest_checkpoint(run_dir)
    record = tracking.read_record(run_dir)
    done = (record.get("models") or {}).get(name)
    if done and done.get("checkpoint") == str(ckpt):
        return done["uri"]
    stage_runs = record.get("stage_runs") or {}
    stage = "seg" if name == "segmenter" else next((s for s in ("cmg_rpc", "cmg") if s in stage_runs), None)
    if ckpt is None or stage not in stage_runs:
        return None
    run_id = stage_runs[stage]
    offset = int(tracking.client_for(cfg).get_run(run_id).data.tags.get(tracking.TAG_STEP_OFFSET, "0"))
    registered = f"{cfg.name}-{name}" if cfg.tracking.register_models else None
    info = log_segmenter(cfg, run_id, segmenter_from_run(run_dir), name, step=checkpoint_step(ckpt) + offset,
                         registered_name=registered)
    tracking.update_record(run_dir, models={name: {"model_id": info.model_id, "uri": info.model_uri,
                                                   "run_id": run_id, "checkpoint": str(ckpt)}})
    print(f"[rayseg] {name} logged to MLflow as {info.model_uri}" + (f" (registered as {registered})"
                                                                       if registered else ""), flush=True)
    return info.model_uri


def _teacher_of(pseudo_labels: str | Path) -> tuple[Path | None, int]:
    """(train run directory, teacher step) a pseudo-label folder was made from (its pseudo.json);
    (None, 0) for an ORACLE folder of ground-truth labels (no teacher: stage seg starts at step 0)."""
    import json

    from rayseg.oracle import is_oracle_meta

    try:
        meta = json.loads((Path(pseudo_labels) / "pseudo.json").read_text())
    except (OSError, ValueError):
        return None, 0
    if not isinstance(meta, dict) or is_oracle_meta(meta):
        return None, 0
    ckpt = meta.get("checkpoint")
    step = ckpt.get("step") if isinstance(ckpt, dict) else None
    if step is None:
        path = ckpt.get("path") if isinstance(ckpt, dict) else ckpt
        step = checkpoint_step(path) if path else 0
    return (Path(meta["run_dir"]) if meta.get("run_dir") else None), int(step or 0)


def _link_teacher(cfg: cfgmod.Config, run_id: str | None, train_dir: Path | None) -> None:
    """Declare the train run's logged teacher as an input of run `run_id` (MLflow's model inputs)."""
    from rayseg.train import tracking

    model = ((tracking.read_record(train_dir).get("models") or {}).get("teacher") or {}) if train_dir else {}
    if run_id and model.get("model_id"):
        from mlflow.entities import LoggedModelInput

        client = tracking.client_for(cfg)
        inputs = client.get_run(run_id).inputs
        if model["model_id"] not in [m.model_id for m in (inputs.model_inputs or [])] if inputs else True:
            client.log_inputs(run_id, models=[LoggedModelInput(model["model_id"])])


def pseudo_label(run_dir: str | Path, out: str | Path, split: str | None = None, *, overwrite: bool = False,
                 parent_run_id: str | None = None, evaluate: bool = True, evaluate_2d: bool = True,
                 checkpoint: str | Path | None = None) -> dict:
    """`rayseg pseudo-label` with MLflow: a 'pseudo-label' pipeline run (or, given parent_run_id,
    a stage run directly under it) whose 'pseudo_label' stage run has the teacher model as input
    and, with `evaluate`, the labels' mIoU against GT (evaluation only) at the step of the
    checkpoint that labels (`checkpoint`, default the run's newest); with `evaluate_2d` too (and
    views in the run), the 2D teacher's pseudo-label mIoU on the split's views
    (teacher_2d_confusion). Returns make_pseudo_labels' summary + "conf" (3D confusion or None),
    "conf_2d" (or None), "run_id" (the stage run), "pipeline_run_id"."""
    from rayseg.data import shards
    from rayseg.pseudo import evaluate_pseudo_labels, make_pseudo_labels
    from rayseg.train import tracking
    from rayseg.train.checkpoint import latest_checkpoint, run_checkpoint

    run_dir = Path(run_dir).resolve()
    out = Path(out).resolve()
    cfg = load_run(run_dir)
    ckpt = run_checkpoint(run_dir, checkpoint).resolve()  # a named error before any MLflow run opens
    step = checkpoint_step(ckpt)
    latest = latest_checkpoint(run_dir)
    newest = latest is not None and ckpt == latest.resolve()
    own = parent_run_id is None
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:  # relabelling: new MLflow runs, not the old labels' ones
        (out / tracking.RUN_RECORD).unlink(missing_ok=True)
    pipeline = tracking.open_pipeline(cfg, out, "pseudo-label", parent_run_id=parent_run_id, own_run=own,
                                      run_name=f"pseudo-label-{run_dir.name}")
    tracker = tracking.stage_tracker(cfg, out, "pseudo_label", parent_run_id=pipeline, step_offset=step,
                                     tags={"rayseg.teacher_run_dir": str(run_dir), "rayseg.pseudo_labels": str(out),
                                           "rayseg.teacher_checkpoint": ckpt.parent.name})
    conf = conf_2d = None
    try:
        if newest:  # the run's logged teacher is its newest checkpoint; an earlier one has no logged model
            _link_teacher(cfg, tracker.run_id, run_dir)
        summary = make_pseudo_labels(run_dir, out, split, overwrite=overwrite, checkpoint=ckpt)  # the one resolved above
        tracker.log_metrics({"stage": tracking.STAGE_INDEX["pseudo_label"], "scenes": summary.get("scenes", 0),
                             "labelled": summary.get("labelled", 0)}, 0)
        if evaluate:
            names = tuple(shards.load_manifest(cfg.data.root)["class_names"])
            conf = evaluate_pseudo_labels(out, cfg.data.root, summary["split"], names)
            summary_metrics = tracker.log_confusion(conf, names, "pseudo_final_3d", 0)
            if evaluate_2d and cfg.data.num_views:
                conf_2d = teacher_2d_confusion(run_dir, ckpt, summary["split"])
                summary_metrics.update(tracker.log_confusion(conf_2d, names, "pseudo_final_2d", 0))
            if own:
                tracking.log_summary(cfg, pipeline, {k: v for k, v in summary_metrics.items()
                                                     if k in ("pseudo_final_3d_miou", "pseudo_final_2d_miou")}, step)
    except BaseException:
        tracker.end("FAILED")
        if own:
            tracking.end_run(cfg, pipeline, "FAILED")
        raise
    tracker.end()
    if own:
        tracking.end_run(cfg, pipeline)
    return {**summary, "conf": conf, "conf_2d": conf_2d, "run_id": tracker.run_id, "pipeline_run_id": pipeline,
            "step": step}


def teacher_2d_confusion(run_dir: str | Path, checkpoint: str | Path | None = None, split: str | None = None):
    """Confusion of the EMA teacher's 2D pseudo-labels (masked softmax -> view-region mean ->
    argmax) against the view GT over all scenes of `split` (default the run's train split), at
    `checkpoint` (default the run's newest). GT is read for the metric only.

    Reads the scenes in this process (the plain loader), not through Ray Data: run as a Ray task
    (tune's trials) it holds its CPUs while it waits for batches, and Ray Data's read tasks each
    need a whole free CPU. Beside the pseudo-label actor and another trial's training worker it
    held the last half CPU of a 2-CPU machine, and all three waited on each other's reads forever."""
    import torch

    from rayseg.data import shards
    from rayseg.models.twobranch import TwoBranchModel
    from rayseg.train.loop import pseudo_label_confusion

    run_cfg, _, state = load_run_checkpoint(run_dir, checkpoint)
    cfg = cfgmod.replace(run_cfg, **{"data.loader": "local", "data.train_split": split or run_cfg.data.train_split})
    num_classes = len(shards.load_manifest(cfg.data.root)["class_names"])
    device = torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")
    model = TwoBranchModel(cfgmod.replace(cfg, **{"model.init_2d": "none"}).model, num_classes)
    model.load_state_dict(state["teacher"])
    model.to(device)
    return pseudo_label_confusion(model, cfg, num_classes, 0, 1, device, None, with_3d=False)["2d"]


def segment(cfg: cfgmod.Config, pseudo_labels: str, resume: str | None = None,
            parent_run_id: str | None = None) -> Path:
    """Stage seg: a fresh MinkUNet trained with cross-entropy on pseudo-label shards, then logged
    as an MLflow model. MLflow: a 'segment' pipeline run (or the stage directly under
    `parent_run_id`); its steps continue from the teacher's that made the pseudo-labels. On an
    ORACLE folder (`rayseg oracle-labels`: ground truth) there is no teacher: steps start at 0 and
    the pipeline and stage runs are tagged rayseg.oracle=true."""
    from rayseg.oracle import MLFLOW_WHAT, is_oracle_folder
    from rayseg.train import tracking

    run_dir = Path(resume).resolve() if resume else None
    if run_dir is not None:
        cfg = load_run(run_dir)
    else:
        cfg = cfgmod.replace(cfg, **{"data.pseudo_labels": str(Path(pseudo_labels).resolve())})
    check_dataset(cfg)
    if not Path(cfg.data.pseudo_labels).is_dir():
        raise FileNotFoundError(f"pseudo-label directory {cfg.data.pseudo_labels} does not exist "
                                f"(make it with `rayseg pseudo-label RUN --out DIR`)")
    run_dir = run_dir or new_run_dir(cfg, "seg")
    train_dir, offset = _teacher_of(cfg.data.pseudo_labels)
    oracle = is_oracle_folder(cfg.data.pseudo_labels)
    tags = {"rayseg.oracle": str(oracle).lower(), "rayseg.pseudo_labels": str(cfg.data.pseudo_labels)}
    if oracle:
        tags["rayseg.oracle_what"] = MLFLOW_WHAT
        print(f"[rayseg] ORACLE: {cfg.data.pseudo_labels} holds GROUND-TRUTH labels (`rayseg oracle-labels`), not "
              f"pseudo-labels: this seg run is the fully supervised upper bound, tagged rayseg.oracle=true, "
              f"not a weakly supervised result.", flush=True)
    with pipeline_run(cfg, run_dir, "segment", parent_run_id, tags=tags) as pipeline:
        if oracle and parent_run_id is not None:  # stages directly under a caller's run: mark that run too
            tracking.client_for(cfg).set_tag(parent_run_id, "rayseg.oracle", "true")
        fit(cfg, run_dir, ["seg"], parent_run_id=pipeline, step_offset=offset)
        _link_teacher(cfg, tracking.stage_run_id(run_dir, "seg"), train_dir)
        log_run_model(cfg, run_dir, "segmenter")
    return run_dir
