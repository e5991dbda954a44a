"""`rayseg demo`: the whole method on synthetic scenes, on a laptop, with an embedded local Ray
and a sqlite MLflow store.

synthetic scenes -> region partition -> stage cmg -> stage cmg_rpc -> pseudo-labels (+ mIoU vs
GT) -> stage seg -> val evaluation -> tables + how to open MLflow. Every step is resumable: a
second `rayseg demo` reuses the prepared data and partition.
"""

from __future__ import annotations

import time
from pathlib import Path

from rayseg import config as cfgmod

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "synthetic-demo.toml"


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(config_path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    from rayseg import metrics as M
    from rayseg.data.prepare import prepare_synthetic
    from rayseg.evaluate import evaluate_run
    from rayseg.partition.job import run_partition
    from rayseg.pseudo import evaluate_pseudo_labels, make_pseudo_labels
    from rayseg.train import launch
    from rayseg.train.tracking import Tracker, tracking_uri

    path = Path(config_path) if config_path else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"demo config {path} not found (pass --config FILE)")
    cfg = cfgmod.load(path, list(overrides)).config
    t_start = time.time()
    launch.quiet_environment()
    launch.init_ray(cfg)

    _banner(f"1/6 synthetic scenes -> {cfg.data.root}")
    summary = prepare_synthetic(cfg.synthetic, cfg.data.root)
    if getattr(summary, "failed", None):
        raise RuntimeError(f"synthetic preparation failed for {len(summary.failed)} scene(s)")

    _banner(f"2/6 region partition '{cfg.data.region_column}'")
    parts = run_partition(cfg.data.root, [cfg.data.region_column], cfg)
    if not parts.ok:
        raise RuntimeError(f"partitioning failed:\n{parts.format()}")

    _banner("3/6 teacher-student training: stage cmg -> stage cmg_rpc")
    train_dir = launch.train(cfg)

    _banner("4/6 pseudo-labels from the EMA teacher")
    pl_dir = train_dir / "pseudo_labels"
    make_pseudo_labels(train_dir, pl_dir)
    class_names = _class_names(cfg)
    conf_pl = evaluate_pseudo_labels(pl_dir, cfg.data.root, cfg.data.train_split, class_names)
    pl_table = M.iou_table(conf_pl, class_names, title="pseudo-labels vs GT, train split (evaluation only)")
    print(pl_table)
    state_run = _mlflow_run_id(train_dir)
    tracker = Tracker(cfg, train_dir.name, run_id=state_run)
    tracker.log_confusion(conf_pl, class_names, "pseudo_final_3d", 0)
    tracker.end()

    _banner("5/6 stage seg: a fresh MinkUNet on the pseudo-labels")
    seg_dir = launch.segment(cfg, str(pl_dir))

    _banner("6/6 evaluation on val")
    result = evaluate_run(seg_dir, cfg.data.val_split)
    print(result["tables"])
    minutes = (time.time() - t_start) / 60
    print(f"\nrayseg demo finished in {minutes:.1f} min."
          f"\n  pseudo-label mIoU (train, 3D): {100 * M.mean_iou(conf_pl):.1f}"
          f"\n  final val mIoU (3D):           {100 * M.mean_iou(result['3d']):.1f}"
          f"\n  runs: {train_dir}\n        {seg_dir}"
          f"\nOpen the runs in the MLflow UI:"
          f"\n  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow ui --backend-store-uri "
          f"{tracking_uri(cfg)} --host 127.0.0.1 --port 5000 --workers 1", flush=True)
    return {"train_dir": train_dir, "seg_dir": seg_dir, "pseudo_miou": M.mean_iou(conf_pl),
            "val_miou": M.mean_iou(result["3d"])}


def _class_names(cfg: cfgmod.Config) -> tuple[str, ...]:
    from rayseg.data import shards

    return tuple(shards.load_manifest(cfg.data.root)["class_names"])


def _mlflow_run_id(run_dir: Path) -> str | None:
    from rayseg.evaluate import load_checkpoint

    return load_checkpoint(run_dir)["progress"]["mlflow_run_id"]
