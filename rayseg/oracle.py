"""The ORACLE label folder: a prepared dataset's ground-truth labels of one split (the train
split), written as a pseudo-label folder, so `rayseg segment --pseudo-labels DIR` trains the same
segmentation network with the same steps fully supervised: the upper bound of a results table,
never a weakly supervised result.

The folder has the layout of `rayseg pseudo-label`'s output (``rayseg/data/pseudo_store.py``):
``OUT/<split>/<scene_id>.parquet`` per scene (GT labels, IGNORE_LABEL kept: stage seg ignores those
points) and ``OUT/pseudo.json``, which says ``"oracle": true`` and carries no teacher run or
checkpoint. The *source* starts with ``ORACLE-gt-`` and hashes the split's GT labels (scene ids +
the sha256 of each label column): files written from other labels are rewritten or refused like
the real job's, a dataset whose GT changed since makes the folder stale (``verify_pseudo_labels``
names it), and re-partitioning the dataset (which rewrites the shards, not their labels) does not.

Per-scene writes are atomic and resumable: a scene whose file reads back with the expected point
count and this source is skipped. Ground truth is read here on purpose, and only here and in
evaluation: the training pipeline still never selects the label columns.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from rayseg.data import shards
from rayseg.data.pseudo_store import (PseudoLabelError, file_source, is_done, pending_scenes, pseudo_path, read_meta,
                                      write_meta, write_pseudo)
from rayseg.data.scene import IGNORE_LABEL

SOURCE_PREFIX = "ORACLE-gt-"
KIND = "ORACLE: ground-truth labels (rayseg oracle-labels), not pseudo-labels"
MLFLOW_WHAT = "ground-truth labels"


def is_oracle_meta(meta: dict | None) -> bool:
    """Whether a pseudo.json describes an ORACLE (ground-truth) label folder."""
    return bool(meta) and (meta.get("oracle") is True or str(meta.get("source", "")).startswith(SOURCE_PREFIX))


def is_oracle_folder(pseudo_labels: str | Path | None) -> bool:
    """Whether a pseudo-label folder holds ORACLE ground-truth labels (its pseudo.json says so)."""
    if not pseudo_labels:
        return False
    try:
        return is_oracle_meta(read_meta(pseudo_labels))
    except PseudoLabelError:
        return False


def _scene_labels(path: Path, num_classes: int) -> tuple[str, np.ndarray]:
    """(scene id, GT labels) of one shard; errors name the shard."""
    scene = shards.read_scene(path, ["label"])  # ShardError naming the file when the column is absent
    labels = np.asarray(scene["label"])
    bad = labels[(labels != IGNORE_LABEL) & (labels >= num_classes)]
    if bad.size:
        raise shards.ShardError(f"shard {path}: scene {scene['scene_id']} has GT label {int(bad[0])}, the dataset "
                                f"has {num_classes} classes (and {IGNORE_LABEL} = ignored)")
    return scene["scene_id"], labels.astype(np.uint8)


def oracle_identity(data_root: str | Path, split: str) -> dict:
    """What decides an oracle folder's labels: the dataset's GT labels of the split. ``source``
    is their short hash, prefixed ORACLE-gt-; ``scenes`` maps scene id -> points (from the labels
    read)."""
    root = Path(data_root).resolve()
    manifest = shards.load_manifest(root)
    num_classes = len(manifest["class_names"])
    digests, sizes = {}, {}
    for path in shards.scene_paths(root, split):
        sid, labels = _scene_labels(path, num_classes)
        digests[sid] = hashlib.sha256(labels.tobytes()).hexdigest()
        sizes[sid] = int(labels.shape[0])
    source = SOURCE_PREFIX + hashlib.sha256(json.dumps({"split": split, "labels": digests},
                                                        sort_keys=True).encode()).hexdigest()[:16]
    return {"oracle": True, "kind": KIND, "source": source,
            "settings": {"dataset": str(root), "split": split, "labels": "ground truth", "region_column": None},
            "sizes": sizes}


def write_oracle_labels(data_root: str | Path, out: str | Path, split: str = "train",
                        overwrite: bool = False) -> dict:
    """Write the split's GT labels as a pseudo-label folder (resumable, atomic per scene). A
    folder holding labels of another source (a teacher's pseudo-labels, or the GT of another
    dataset version) is refused (PseudoLabelError) unless ``overwrite``. Returns pseudo.json +
    "written" (scenes written now), "seconds"."""
    root = Path(data_root).resolve()
    out = Path(out).resolve()
    t0 = time.time()
    identity = oracle_identity(root, split)
    sizes = identity.pop("sizes")
    source = identity["source"]
    old = read_meta(out)
    todo, foreign = pending_scenes(out, split, ((path, path.stem) for path in shards.scene_paths(root, split)),
                                   source, sizes)
    if not overwrite and ((old is not None and old.get("source") != source) or foreign):
        if old is not None and old.get("source") != source:
            why = (f"{out / 'pseudo.json'} records source {old.get('source') or '(unrecorded)'}"
                   + (" (ORACLE labels of other ground truth: the dataset changed since)" if is_oracle_meta(old)
                      else f" (pseudo-labels of run {old.get('run_dir', '?')})") + f", the GT of {root} split "
                   f"{split!r} is source {source}")
        else:
            why = f"{len(foreign)} scene file(s) such as {foreign[0]} were made by source {file_source(foreign[0]) or '(unrecorded)'}"
        raise PseudoLabelError(f"{out} holds labels of another source ({why}); use another --out, or --overwrite "
                               "to rewrite them")
    meta = {**identity, "complete": False, "scenes": len(sizes)}
    out.mkdir(parents=True, exist_ok=True)
    write_meta(out, meta)  # before the first file: the folder says what its files are
    print(f"[rayseg] ORACLE labels (ground truth of {root} split {split!r}, NOT pseudo-labels): "
          f"{len(sizes) - len(todo)} of {len(sizes)} scenes already written, {len(todo)} to write "
          f"(source {source})", flush=True)
    num_classes = len(shards.load_manifest(root)["class_names"])
    for path in todo:
        sid, labels = _scene_labels(path, num_classes)
        if sid != path.stem:
            raise shards.ShardError(f"shard {path}: holds scene {sid}, its file name says {path.stem}")
        if labels.shape[0] != sizes.get(sid):
            raise shards.ShardError(f"shard {path}: scene {sid} has {labels.shape[0]} labels now, "
                                    f"{sizes.get(sid)} a moment ago (rewritten while reading?); run again")
        write_pseudo(pseudo_path(out, split, sid), sid, labels, source)
    missing = [sid for sid in sizes if not is_done(pseudo_path(out, split, sid), source, sizes[sid])]
    if missing:
        raise PseudoLabelError(f"{out}: {len(missing)} scene(s) not written (e.g. {pseudo_path(out, split, missing[0])}); "
                               "re-run the command")
    meta["complete"] = True
    write_meta(out, meta)
    return {**meta, "written": len(todo), "seconds": time.time() - t0}
