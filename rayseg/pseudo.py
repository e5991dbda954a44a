"""Pseudo-labels: batch inference of a run's EMA teacher over the train split, as a Ray Data
job with an actor pool, written as one Parquet file per scene (atomic, resumable).

Per scene (METHOD.md): teacher 3D logits on the un-augmented scene -> masked softmax with the
scene tags -> probabilities averaged within each region -> argmax. No threshold. The job never
reads ground truth; `evaluate_pseudo_labels` reads the GT label column afterwards, for the
printed / logged mIoU only.

Output (stored and read by ``rayseg/data/pseudo_store.py``, which the data pipeline uses too):
``OUT/<split>/<scene_id>.parquet`` with columns scene_id, pseudo_label (uint8 per point,
in the scene's point order), num_points; ``OUT/pseudo.json`` names the run, the checkpoint (path,
step, sha256 of its bytes) and the settings that decide the labels (dataset, split, voxel size,
region column and the parameter hash of its partition, pooling mode, model), and their short
hash, the *source*. Every scene file carries the source in its Parquet metadata.

A scene counts as done only when its file reads back with the expected point count and carries
the current source, so labels of another checkpoint or other settings are never reused: a folder
holding another source is refused (``overwrite=True`` relabels it), and readers
(``evaluate_pseudo_labels``, ``verify_pseudo_labels``, ``check_folder``) refuse files whose source
differs from the folder's pseudo.json. pseudo.json is written (``complete: false``) before the first
label and rewritten (``complete: true``) after the last.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from rayseg import config as cfgmod
from rayseg.data.pseudo_store import (META_FILE, PseudoLabelError, file_source, is_done, pending_scenes, pseudo_path,
                                      read_meta, read_pseudo, write_meta, write_pseudo)


def _region_params_hash(cfg: cfgmod.Config) -> str | None:
    """The parameter hash `rayseg partition` recorded for the run's region column (None: no
    region column, or no record)."""
    if not cfg.data.region_column:
        return None
    from rayseg.partition.job import load_sidecar

    sidecar = load_sidecar(Path(cfg.data.root))
    return sidecar["methods"].get(cfg.data.region_column, {}).get("hash")


def labelling_identity(run_dir: Path, ckpt: Path, cfg: cfgmod.Config, split: str) -> dict:
    """What decides a folder's labels: the checkpoint's bytes and the settings inference uses;
    ``source`` is their short hash (the run directory and checkpoint path are kept for people,
    not hashed: a copied run gives the same labels)."""
    from rayseg.data import shards
    from rayseg.train.checkpoint import parse_checkpoint_name

    flat = cfgmod.flatten(cfgmod.to_dict(cfg))
    settings = {
        "dataset": str(Path(cfg.data.root).resolve()), "split": split, "voxel_size": cfg.data.voxel_size,
        "region_column": cfg.data.region_column, "region_params": _region_params_hash(cfg),
        "mode": cfg.loss.rpc.mode, "model": {k: v for k, v in sorted(flat.items()) if k.startswith("model.")},
    }
    digest = shards.sha256_file(ckpt)
    parsed = parse_checkpoint_name(ckpt.parent.name)
    source = hashlib.sha256(json.dumps({"checkpoint_sha256": digest, "settings": settings},
                                       sort_keys=True).encode()).hexdigest()[:16]
    return {"source": source, "run_dir": str(run_dir),
            "checkpoint": {"path": str(ckpt), "sha256": digest, "step": parsed[0] if parsed else None},
            "settings": settings}


def _difference(old: dict, new: dict) -> str:
    """What differs between two labelling identities, in words."""
    if "source" not in old:
        return "the folder was labelled by an older rayseg that did not record its checkpoint hash"
    from rayseg.oracle import is_oracle_meta

    if is_oracle_meta(old):
        return (f"it holds ORACLE ground-truth labels (`rayseg oracle-labels`, source {old.get('source')}), "
                f"not a teacher's pseudo-labels")
    parts = []
    o_ck, n_ck = old.get("checkpoint", {}), new["checkpoint"]
    if o_ck.get("sha256") != n_ck["sha256"]:
        parts.append(f"checkpoint: {o_ck.get('path')} (step {o_ck.get('step')}, sha256 {str(o_ck.get('sha256'))[:12]}) "
                     f"there, {n_ck['path']} (step {n_ck['step']}, sha256 {n_ck['sha256'][:12]}) now")
    o_set, n_set = old.get("settings", {}), new["settings"]
    for key in sorted(set(o_set) | set(n_set)):
        if o_set.get(key) != n_set.get(key):
            parts.append(f"{key}: {o_set.get(key)!r} there, {n_set.get(key)!r} now")
    return "; ".join(parts) or f"source {old.get('source')} there, {new['source']} now"


class TeacherLabeler:
    """Ray Data actor: loads the teacher once, labels one infer-mode sample per call."""

    def __init__(self, checkpoint: str, flat_config: dict, num_classes: int, out: str, split: str,
                 source: str = ""):
        import torch

        from rayseg.models.twobranch import TwoBranchModel
        from rayseg.train.checkpoint import load_state

        self.cfg = cfgmod.build(flat_config)
        self.device = torch.device("cuda" if self.cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")
        state = load_state(checkpoint, self.device)
        self.model = TwoBranchModel(self.cfg.model, num_classes)
        self.model.load_state_dict(state["teacher"])
        self.model.to(self.device).eval()
        self.out, self.split, self.source = out, split, source

    def __call__(self, row: dict) -> dict:
        import torch

        from rayseg import losses as L
        from rayseg.data import pipeline
        from rayseg.train.device import to_device

        sample = pipeline.from_ray_row(row)
        b = to_device(pipeline.collate([sample]), self.device)
        with torch.no_grad():
            logits = self.model.forward_3d(b["coord"], b["feat"])["logits"][b["inverse"]]
            labels = L.scene_pseudo_labels(logits, b["tags"][0], b.get("region"), self.cfg.loss.rpc.mode)
        scene_id = sample["scene_id"] if isinstance(sample["scene_id"], str) else sample["scene_id"][0]
        write_pseudo(pseudo_path(self.out, self.split, scene_id), scene_id, labels.cpu().numpy(), self.source)
        return {"scene_id": scene_id, "num_points": int(labels.shape[0])}


def make_pseudo_labels(run_dir: str | Path, out: str | Path, split: str | None = None,
                       overwrite: bool = False, checkpoint: str | Path | None = None) -> dict:
    """Label every scene of the split that is not labelled yet by this checkpoint (`checkpoint`,
    e.g. the end of stage cmg; default the run's newest) and these settings (resumable). A
    folder holding labels of another checkpoint or settings is refused (PseudoLabelError naming
    what differs) unless ``overwrite``, which relabels those scenes. Returns a summary."""
    import ray

    from rayseg.data import pipeline, shards
    from rayseg.train.launch import init_ray, load_run
    from rayseg.train.checkpoint import run_checkpoint

    run_dir = Path(run_dir).resolve()
    cfg = load_run(run_dir)
    split = split or cfg.data.train_split
    ckpt = run_checkpoint(run_dir, checkpoint).resolve()
    out = Path(out).resolve()
    cfg = cfgmod.replace(cfg, **{"data.num_views": 0})  # 3D pseudo-labels need no images
    shards.scene_paths(cfg.data.root, split)  # missing / truncated shards named before Ray reads them
    if cfg.data.region_column:  # regions of two parameter sets (an unfinished re-partition): refused
        from rayseg.partition.job import verify_partitions

        mixed = verify_partitions(cfg.data.root, [cfg.data.region_column], coverage=False)
        if mixed:
            raise PseudoLabelError(f"{cfg.data.root}: {mixed[0]}" + (f" (and {len(mixed) - 1} more)" if len(mixed) > 1 else ""))
    p = pipeline.plan(cfg.data.root, split, cfg, "infer", 0, cfg.seed)
    identity = labelling_identity(run_dir, ckpt, cfg, split)
    source = identity["source"]
    sizes = {e["scene_id"]: e.get("num_points") for e in shards.load_manifest(cfg.data.root)["scenes"]
             if e["split"] == split}
    old = read_meta(out)
    todo, foreign = pending_scenes(out, split, zip(p.paths, p.scene_ids), source, sizes)
    if not overwrite and ((old is not None and old.get("source") != source) or foreign):
        why = _difference(old, identity) if old is not None and old.get("source") != source else \
            f"{len(foreign)} scene file(s) such as {foreign[0]} were made by source {file_source(foreign[0]) or '(unrecorded)'}"
        raise PseudoLabelError(f"{out} holds pseudo-labels made by another checkpoint or settings ({why}); "
                               "use another --out, or --overwrite to relabel them")
    meta = {**identity, "complete": False, "scenes": len(p.paths)}
    out.mkdir(parents=True, exist_ok=True)
    write_meta(out, meta)  # before the first label: the folder says what its files come from
    print(f"[rayseg] pseudo-labels: {len(p.paths) - len(todo)} of {len(p.paths)} scenes already done, "
          f"{len(todo)} to label with {ckpt} (source {source}"
          + (f"; {len(foreign)} made by another source are relabelled" if foreign else "") + ")", flush=True)
    t0 = time.time()
    if todo:
        import ray.data

        init_ray(cfg)
        ds = pipeline.ray_samples([(0, p.only(todo))], cfg, cfg.seed)
        ds = ds.map(TeacherLabeler, fn_constructor_kwargs=dict(
            checkpoint=str(ckpt), flat_config=cfgmod.flatten(cfgmod.to_dict(cfg)),
            num_classes=len(p.class_names), out=str(out), split=split, source=source),
            compute=ray.data.ActorPoolStrategy(size=cfg.ray.inference_actors), num_gpus=1 if cfg.ray.use_gpu else 0,
            num_cpus=cfg.ray.cpus_per_worker)
        done = 0
        for _ in ds.iter_rows():
            done += 1
            if done % 10 == 0 or done == len(todo):
                print(f"[rayseg] pseudo-labels: {done}/{len(todo)} scenes "
                      f"({done / max(time.time() - t0, 1e-9):.2f} scenes/s)", flush=True)
    missing = [sid for sid in p.scene_ids if not is_done(pseudo_path(out, split, sid), source, sizes.get(sid))]
    if missing:
        raise PseudoLabelError(f"{out}: {len(missing)} scene(s) were not labelled (e.g. {missing[0]}); re-run the command")
    meta["complete"] = True
    write_meta(out, meta)
    return {**meta, "checkpoint": str(ckpt), "dataset": identity["settings"]["dataset"], "split": split,
            "labelled": len(todo), "seconds": time.time() - t0}


def check_folder(out: str | Path, data_root: str | Path | None = None, split: str | None = None) -> dict:
    """Refuse a pseudo-label folder that is not complete and consistent (PseudoLabelError naming
    the first problem, see verify_pseudo_labels); returns its pseudo.json."""
    problems, _ = verify_pseudo_labels(out, data_root, split)
    if problems:
        more = f" (and {len(problems) - 1} more; `rayseg doctor {out}` lists them)" if len(problems) > 1 else ""
        raise PseudoLabelError(f"pseudo-labels {out}: {problems[0]}{more}")
    return read_meta(out) or {}


def verify_pseudo_labels(out: str | Path, data_root: str | Path | None = None,
                         split: str | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes) of a pseudo-label folder against its pseudo.json and its dataset's
    manifest: incomplete labelling, a scene without a file, unreadable files, wrong scene or point
    count, files of another source, a region column recomputed with other parameters since.
    Notes: the checkpoint changed or gone, the run trained on since (not wrong, worth knowing)."""
    from rayseg.data import shards

    out = Path(out)
    if not out.is_dir():
        return [f"{out}: pseudo-label folder does not exist"], []
    try:
        meta = read_meta(out)
    except PseudoLabelError as exc:
        return [str(exc)], []
    if meta is None:
        return [f"{out / META_FILE}: missing: not a complete `rayseg pseudo-label` output"], []
    problems, notes = [], []
    source = meta.get("source")
    settings = meta.get("settings", {})
    from rayseg.oracle import is_oracle_meta, oracle_identity

    oracle = is_oracle_meta(meta)
    if oracle:
        notes.append(f"ORACLE: ground-truth labels of split {settings.get('split')!r} (`rayseg oracle-labels`), "
                     "not pseudo-labels: a seg run on them is the fully supervised upper bound")
    if source is None:
        problems.append(f"{out / META_FILE}: no source recorded (an older rayseg): nothing proves which "
                        "checkpoint made the files; relabel with `rayseg pseudo-label RUN --out DIR --overwrite`")
    if not meta.get("complete"):
        problems.append(f"{out / META_FILE}: labelling did not finish (re-run `rayseg pseudo-label`)")
    root = Path(data_root or settings.get("dataset") or meta.get("dataset", ""))
    split = split or settings.get("split") or meta.get("split")
    manifest = shards.load_manifest(root)
    entries = [e for e in manifest["scenes"] if e["split"] == split]
    for e in entries:
        path = pseudo_path(out, split, e["scene_id"])
        try:
            read_pseudo(path, e["scene_id"], e.get("num_points"), source if source is not None else None)
        except (FileNotFoundError, ValueError) as exc:
            problems.append(str(exc))
    listed = {e["scene_id"] for e in entries}
    for extra in sorted((out / split).glob("*.parquet")) if (out / split).is_dir() else []:
        if extra.stem not in listed:
            problems.append(f"{extra}: no scene {extra.stem!r} in split {split!r} of {root}")
    if oracle and not problems:  # the dataset's GT may have changed since the labels were copied
        now = oracle_identity(root, split)["source"]
        if now != source:
            problems.append(f"{out}: ORACLE labels of source {source}, the ground truth of {root} split {split!r} is "
                            f"now {now} (the dataset changed since): rewrite them with `rayseg oracle-labels "
                            f"CONFIG --out {out} --overwrite`")
    region_column = settings.get("region_column")
    if region_column and (root / "partitions.json").is_file():
        from rayseg.partition.job import load_sidecar

        now = load_sidecar(root)["methods"].get(region_column, {}).get("hash")
        if now != settings.get("region_params"):
            problems.append(f"{out}: made with region_{region_column} of parameters {settings.get('region_params')}, "
                            f"the dataset's region_{region_column} is now {now}: relabel (--overwrite)")
    ckpt = meta.get("checkpoint", {})
    if isinstance(ckpt, dict) and ckpt.get("path"):
        path = Path(ckpt["path"])
        if not path.is_file():
            notes.append(f"checkpoint {path} no longer exists (labels stay valid; sha256 {str(ckpt.get('sha256'))[:12]})")
        elif shards.sha256_file(path) != ckpt.get("sha256"):
            problems.append(f"checkpoint {path} has changed since it made these labels (sha256 differs)")
        run_dir = Path(meta.get("run_dir", ""))
        if run_dir.is_dir():
            from rayseg.train.checkpoint import latest_checkpoint

            newest = latest_checkpoint(run_dir)
            if newest is not None and newest != path:
                notes.append(f"run {run_dir} has a newer checkpoint {newest.parent.name} than the one these "
                             f"labels come from ({path.parent.name})")
    return problems, notes


def evaluate_pseudo_labels(out: str | Path, data_root: str | Path, split: str, class_names) -> "object":
    """Confusion counts of stored pseudo-labels against GT (evaluation only)."""
    import torch

    from rayseg import metrics as M
    from rayseg.data import shards

    meta = read_meta(out) or {}
    source = meta.get("source")  # every file must come from the source pseudo.json names
    conf = torch.zeros(len(class_names), len(class_names), dtype=torch.int64)
    for path in shards.scene_paths(data_root, split):
        scene = shards.read_scene(path, ["scene_id", "label"])
        pl = read_pseudo(pseudo_path(out, split, scene["scene_id"]), scene["scene_id"], scene["label"].shape[0],
                         source)
        conf += M.confusion_matrix(torch.from_numpy(pl.astype(np.int64)),
                                   torch.from_numpy(scene["label"].astype(np.int64)), len(class_names))
    return conf
