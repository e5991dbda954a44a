"""Driver side of training: Ray start-up, run directories, and the TorchTrainer around
`rayseg.train.loop.train_func`.

A run directory (``<runs_dir>/<run name>/``) holds the resolved config, the checkpoints the
loop writes every epoch, Ray Train's own storage, and later the pseudo-labels. Resuming a run
(`--resume RUN_DIR`) continues from its newest checkpoint, in the same MLflow run.
"""

from __future__ import annotations

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


def init_ray(cfg: cfgmod.Config) -> None:
    """Join cfg.ray.address (or RAY_ADDRESS), else start an embedded local Ray. The local head
    declares a small TRAIN_DRIVER resource so Tune trial drivers can be scheduled with 0 CPUs."""
    import ray

    quiet_environment()
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {k: os.environ[k] for k in ("RAY_USAGE_STATS_ENABLED", "MLFLOW_DISABLE_TELEMETRY",
                                                   "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS") if k in os.environ}}
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


def fit(cfg: cfgmod.Config, run_dir: Path, stages: list[str], parent_run_id: str | None = None,
        callbacks: list | None = None) -> dict:
    """Run the stages in a TorchTrainer (num_workers 0 = Ray Train local mode, same process).
    `callbacks` go to the trainer's RunConfig (e.g. Tune's TuneReportCallback inside a trial).
    Returns the last reported metrics."""
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
                           "stages": stages, "run_name": run_dir.name, "parent_run_id": parent_run_id},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"{run_dir.name}-{'-'.join(stages)}-{uuid.uuid4().hex[:6]}",
            storage_path=str(run_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.tracking.keep_checkpoints or None),
            callbacks=list(callbacks or [])),
    )
    result = trainer.fit()
    return dict(result.metrics or {})


def train(cfg: cfgmod.Config, resume: str | None = None) -> Path:
    """Stages cmg -> cmg_rpc as one experiment. Returns the run directory."""
    check_dataset(cfg)
    run_dir = Path(resume).resolve() if resume else new_run_dir(cfg, "train")
    if resume:
        cfg = load_run(run_dir)
    stages = [s for s, epochs in (("cmg", cfg.optim.cmg_epochs), ("cmg_rpc", cfg.optim.cmg_rpc_epochs)) if epochs]
    if not stages:
        raise cfgmod.ConfigError("optim.cmg_epochs and optim.cmg_rpc_epochs are both 0: nothing to train")
    fit(cfg, run_dir, stages)
    return run_dir


def segment(cfg: cfgmod.Config, pseudo_labels: str, resume: str | None = None) -> Path:
    """Stage seg: a fresh MinkUNet trained with cross-entropy on pseudo-label shards."""
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
    fit(cfg, run_dir, ["seg"])
    return run_dir
