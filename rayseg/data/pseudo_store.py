"""Pseudo-label storage: one Parquet file per scene and the folder's ``pseudo.json``.

Layout: ``OUT/<split>/<scene_id>.parquet`` with columns scene_id, pseudo_label (uint8 per point,
in the scene's point order), num_points; each file carries the *source* (the short hash of what
made it, see ``rayseg.pseudo.labelling_identity``) in its Parquet metadata. ``OUT/pseudo.json``
(META_FILE) records the run, the checkpoint and the settings of the labelling, its source and
whether it completed.

Only reading and writing lives here (the data pipeline reads labels for stage seg); making the
labels is the job of ``rayseg/pseudo.py``. This module imports nothing from rayseg.train or
rayseg.pseudo, so the data line stays one-way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rayseg.atomic import atomic_path

PSEUDO_COLUMN = "pseudo_label"
META_FILE = "pseudo.json"
SOURCE_KEY = b"rayseg.pseudo.source"


class PseudoLabelError(ValueError):
    """A pseudo-label folder is incomplete, or holds labels of another checkpoint or settings."""


def pseudo_path(out: str | Path, split: str, scene_id: str) -> Path:
    return Path(out) / split / f"{scene_id}.parquet"


def write_pseudo(path: Path, scene_id: str, labels: np.ndarray, source: str = "") -> None:
    """Atomic write of one scene's pseudo-labels; ``source`` (what made them) goes into the
    file's Parquet metadata."""
    table = pa.table({"scene_id": [scene_id], PSEUDO_COLUMN: [labels.astype(np.uint8)],
                      "num_points": [int(labels.shape[0])]})
    table = table.replace_schema_metadata({SOURCE_KEY: source.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def file_source(path: str | Path) -> str | None:
    """The source recorded in a pseudo-label file ('' for files of older rayseg versions);
    None when the file does not exist or its footer does not read."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - missing / truncated / not parquet
        return None
    return meta.get(SOURCE_KEY, b"").decode()


def read_pseudo(path: str | Path, scene_id: str | None = None, num_points: int | None = None,
                source: str | None = None) -> np.ndarray:
    """One scene's pseudo-labels; checks the scene id, point count and source when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pseudo-labels for scene {scene_id or path.stem} not found: {path}")
    try:
        table = pq.read_table(path)
        row = table.to_pylist()[0]
    except Exception as exc:  # noqa: BLE001 - any read failure is a corrupt file
        raise ValueError(f"{path}: unreadable pseudo-label file ({exc})") from None
    labels = np.asarray(row[PSEUDO_COLUMN], dtype=np.uint8)
    if scene_id is not None and row["scene_id"] != scene_id:
        raise ValueError(f"{path}: holds scene {row['scene_id']}, expected {scene_id}")
    if num_points is not None and labels.shape[0] != num_points:
        raise ValueError(f"{path}: {labels.shape[0]} pseudo-labels for scene {row['scene_id']} "
                         f"with {num_points} points (made from a different version of the dataset?)")
    if source is not None:
        have = (table.schema.metadata or {}).get(SOURCE_KEY, b"").decode()
        if have != source:
            raise PseudoLabelError(f"{path}: made by source {have or '(unrecorded)'}, but {path.parent.parent / META_FILE} "
                                   f"records {source}: labels of another checkpoint or settings mixed into the "
                                   "folder (re-run `rayseg pseudo-label` with --overwrite)")
    return labels


def is_done(path: Path, source: str, num_points: int | None = None) -> bool:
    """Whether a scene's file reads back with the expected point count and carries ``source``."""
    try:
        read_pseudo(path, num_points=num_points, source=source)
        return True
    except (FileNotFoundError, ValueError):
        return False


def pending_scenes(out: str | Path, split: str, scenes, source: str,
                   sizes: dict[str, int | None]) -> tuple[list[Path], list[Path]]:
    """Of (shard path, scene id) pairs, the shards whose label file in `out` is not yet done for
    `source` (to write), and the label files there that another source wrote (to refuse)."""
    todo, foreign = [], []
    for path, sid in scenes:
        target = pseudo_path(out, split, sid)
        if is_done(target, source, sizes.get(sid)):
            continue
        todo.append(path)
        if file_source(target) not in (None, source):
            foreign.append(target)
    return todo, foreign


def read_meta(out: str | Path) -> dict | None:
    """A pseudo-label folder's pseudo.json, or None when it has none."""
    path = Path(out) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PseudoLabelError(f"{path}: unreadable ({exc}); delete the folder or pass --overwrite") from None
    if not isinstance(meta, dict):
        raise PseudoLabelError(f"{path}: not a rayseg pseudo-label record")
    return meta


def write_meta(out: Path, meta: dict) -> None:
    """Atomic write of a pseudo-label folder's pseudo.json."""
    with atomic_path(out / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
