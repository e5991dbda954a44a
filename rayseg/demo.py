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

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "synthetic-demo-s3dis.toml"


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(config_path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    from rayseg import metrics as M
    from rayseg.data.prepare import prepare_synthetic
    from rayseg.evaluate import evaluate_run
    from rayseg.partition.job import run_partition
    from rayseg.train.loop import latest_checkpoint
    from rayseg.train import launch, tracking

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

    # MLflow: one parent run for the whole demo; every stage below is a child run of it.
    run_name = f"{cfg.name}-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    demo_run = tracking.Tracker(cfg, run_name, tags={tracking.TAG_PIPELINE: "demo"})
    try:
        _banner("3/6 teacher-student training: stage cmg -> stage cmg_rpc")
        train_dir = launch.train(cfg, parent_run_id=demo_run.run_id)

        _banner("4/6 pseudo-labels from the EMA teacher")
        pl_dir = train_dir / "pseudo_labels"
        pl = launch.pseudo_label(train_dir, pl_dir, parent_run_id=demo_run.run_id)
        class_names = _class_names(cfg)
        conf_pl = pl["conf"]
        print(M.iou_table(conf_pl, class_names, title="pseudo-labels vs GT, train split (evaluation only)"))

        _banner("5/6 stage seg: a fresh MinkUNet on the pseudo-labels")
        seg_dir = launch.segment(cfg, str(pl_dir), parent_run_id=demo_run.run_id)

        _banner("6/6 evaluation on val")
        result = evaluate_run(seg_dir, cfg.data.val_split)  # logged to the seg stage run, last step
        print(result["tables"])
        final_step = launch.checkpoint_step(latest_checkpoint(seg_dir)) + pl["step"]
        demo_run.log_metrics({"pseudo_final_3d_miou": M.mean_iou(conf_pl), "val_3d_miou": M.mean_iou(result["3d"])},
                             final_step)
        models = tracking.read_record(seg_dir).get("models") or {}
    except BaseException:
        demo_run.end("FAILED")
        raise
    demo_run.end()
    minutes = (time.time() - t_start) / 60
    print(f"\nrayseg demo finished in {minutes:.1f} min."
          f"\n  pseudo-label mIoU (train, 3D): {100 * M.mean_iou(conf_pl):.1f}"
          f"\n  final val mIoU (3D):           {100 * M.mean_iou(result['3d']):.1f}"
          f"\n  runs: {train_dir}\n        {seg_dir}"
          + (f"\n  segmenter model: {models['segmenter']['uri']} (rayseg predict MODEL SCAN.ply --out DIR)"
             if "segmenter" in models else "")
          + f"\nOpen the runs in the MLflow UI (experiment '{cfg.tracking.experiment}', parent run '{run_name}'):"
          f"\n  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow ui --backend-store-uri "
          f"{tracking.tracking_uri(cfg)} --host 127.0.0.1 --port 5000 --workers 1", flush=True)
    return {"train_dir": train_dir, "seg_dir": seg_dir, "pseudo_miou": M.mean_iou(conf_pl),
            "val_miou": M.mean_iou(result["3d"]), "mlflow_run_id": demo_run.run_id}


def _class_names(cfg: cfgmod.Config) -> tuple[str, ...]:
    from rayseg.data import shards

    return tuple(shards.load_manifest(cfg.data.root)["class_names"])
