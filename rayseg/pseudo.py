"""Pseudo-labels: batch inference of a run's EMA teacher over the train split, as a Ray Data
job with an actor pool, written as one Parquet file per scene (atomic, resumable).

Per scene (METHOD.md): teacher 3D logits on the un-augmented scene -> masked softmax with the
scene tags -> probabilities averaged within each region -> argmax. No threshold. The job never
reads ground truth; `evaluate_pseudo_labels` reads the GT label column afterwards, for the
printed / logged mIoU only.

Output: ``OUT/<split>/<scene_id>.parquet`` with columns scene_id, pseudo_label (uint8 per point,
in the scene's point order), num_points; ``OUT/pseudo.json`` names the run and checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayseg import config as cfgmod

PSEUDO_COLUMN = "pseudo_label"


def pseudo_path(out: str | Path, split: str, scene_id: str) -> Path:
    return Path(out) / split / f"{scene_id}.parquet"


def write_pseudo(path: Path, scene_id: str, labels: np.ndarray) -> None:
    """Atomic write of one scene's pseudo-labels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"scene_id": [scene_id], PSEUDO_COLUMN: [labels.astype(np.uint8)],
                      "num_points": [int(labels.shape[0])]})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_pseudo(path: str | Path, scene_id: str | None = None, num_points: int | None = None) -> np.ndarray:
    """One scene's pseudo-labels; checks the scene id and point count when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pseudo-labels for scene {scene_id or path.stem} not found: {path}")
    try:
        row = pq.read_table(path).to_pylist()[0]
    except Exception as exc:  # noqa: BLE001 - any read failure is a corrupt file
        raise ValueError(f"{path}: unreadable pseudo-label file ({exc})") from None
    labels = np.asarray(row[PSEUDO_COLUMN], dtype=np.uint8)
    if scene_id is not None and row["scene_id"] != scene_id:
        raise ValueError(f"{path}: holds scene {row['scene_id']}, expected {scene_id}")
    if num_points is not None and labels.shape[0] != num_points:
        raise ValueError(f"{path}: {labels.shape[0]} pseudo-labels for scene {row['scene_id']} "
                         f"with {num_points} points (made from a different version of the dataset?)")
    return labels


def _is_done(path: Path) -> bool:
    try:
        read_pseudo(path)
        return True
    except (FileNotFoundError, ValueError):
        return False


class TeacherLabeler:
    """Ray Data actor: loads the teacher once, labels one infer-mode sample per call."""

    def __init__(self, checkpoint: str, flat_config: dict, num_classes: int, out: str, split: str):
        import torch

        from rayseg.models.twobranch import TwoBranchModel
        from rayseg.train.checkpoint import load_state

        self.cfg = cfgmod.build(flat_config)
        self.device = torch.device("cuda" if self.cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")
        state = load_state(checkpoint, self.device)
        self.model = TwoBranchModel(self.cfg.model, num_classes)
        self.model.load_state_dict(state["teacher"])
        self.model.to(self.device).eval()
        self.out, self.split = out, split

    def __call__(self, row: dict) -> dict:
        import torch

        from rayseg import losses as L
        from rayseg.data import pipeline
        from rayseg.train.loop import to_device

        sample = pipeline.from_ray_row(row)
        b = to_device(pipeline.collate([sample]), self.device)
        with torch.no_grad():
            logits = self.model.forward_3d(b["coord"], b["feat"])["logits"][b["inverse"]]
            labels = L.scene_pseudo_labels(logits, b["tags"][0], b.get("region"), self.cfg.loss.rpc.mode)
        scene_id = sample["scene_id"] if isinstance(sample["scene_id"], str) else sample["scene_id"][0]
        write_pseudo(pseudo_path(self.out, self.split, scene_id), scene_id, labels.cpu().numpy())
        return {"scene_id": scene_id, "num_points": int(labels.shape[0])}


def make_pseudo_labels(run_dir: str | Path, out: str | Path, split: str | None = None) -> dict:
    """Label every scene of the split that is not labelled yet (resumable). Returns a summary."""
    import ray

    from rayseg.data import pipeline
    from rayseg.train.launch import init_ray, load_run
    from rayseg.train.loop import latest_checkpoint

    run_dir = Path(run_dir).resolve()
    cfg = load_run(run_dir)
    split = split or cfg.data.train_split
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint (train the run first)")
    out = Path(out).resolve()
    cfg = cfgmod.replace(cfg, **{"data.num_views": 0})  # 3D pseudo-labels need no images
    p = pipeline.plan(cfg.data.root, split, cfg, "infer", 0, cfg.seed)
    todo = [path for path, sid in zip(p.paths, p.scene_ids) if not _is_done(pseudo_path(out, split, sid))]
    print(f"[rayseg] pseudo-labels: {len(p.paths) - len(todo)} of {len(p.paths)} scenes already done, "
          f"{len(todo)} to label with {ckpt}", flush=True)
    t0 = time.time()
    if todo:
        import ray.data

        init_ray(cfg)
        sub = pipeline.DatasetPlan(**{**p.__dict__, "paths": todo, "scene_ids": [x.stem for x in todo]})
        ds = pipeline.ray_dataset_from_plan(sub, cfg, 0, cfg.seed)
        ds = ds.map(TeacherLabeler, fn_constructor_kwargs=dict(
            checkpoint=str(ckpt), flat_config=cfgmod.flatten(cfgmod.to_dict(cfg)),
            num_classes=len(p.class_names), out=str(out), split=split),
            compute=ray.data.ActorPoolStrategy(size=cfg.ray.inference_actors), num_gpus=1 if cfg.ray.use_gpu else 0,
            num_cpus=cfg.ray.cpus_per_worker)
        done = 0
        for _ in ds.iter_rows():
            done += 1
            if done % 10 == 0 or done == len(todo):
                print(f"[rayseg] pseudo-labels: {done}/{len(todo)} scenes "
                      f"({done / max(time.time() - t0, 1e-9):.2f} scenes/s)", flush=True)
    meta = {"run_dir": str(run_dir), "checkpoint": str(ckpt), "split": split, "dataset": str(Path(cfg.data.root).resolve()),
            "region_column": cfg.data.region_column, "mode": cfg.loss.rpc.mode, "scenes": len(p.paths)}
    tmp = out / ".pseudo.json.tmp"
    out.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "pseudo.json")
    return {**meta, "labelled": len(todo), "seconds": time.time() - t0}


def evaluate_pseudo_labels(out: str | Path, data_root: str | Path, split: str, class_names) -> "object":
    """Confusion counts of stored pseudo-labels against GT (evaluation only)."""
    import torch

    from rayseg import metrics as M
    from rayseg.data import shards

    conf = torch.zeros(len(class_names), len(class_names), dtype=torch.int64)
    for path in shards.scene_paths(data_root, split):
        scene = shards.read_scene(path, ["scene_id", "label"])
        pl = read_pseudo(pseudo_path(out, split, scene["scene_id"]), scene["scene_id"], scene["label"].shape[0])
        conf += M.confusion_matrix(torch.from_numpy(pl.astype(np.int64)),
                                   torch.from_numpy(scene["label"].astype(np.int64)), len(class_names))
    return conf
