"""Parquet shards: one file per scene, one row per file, plus ``ROOT/manifest.json``.

Layout::

    ROOT/manifest.json                 schema version, profile, class names, per-split counts,
                                       one entry per file (size, sha256, points, views, regions)
    ROOT/<split>/<scene_id>.parquet    one row: the scene record of rayseg/data/scene.py

Row columns (column name = scene key, so ``read_parquet(columns=...)`` selects scene keys):

- ``scene_id``, ``split``: strings;
- ``schema_version``, ``num_points``, ``num_views``, ``image_height``, ``image_width``: integers,
  bookkeeping that lets readers size things without decoding (not scene keys);
- per-view columns, list<binary> with one value per view, so a reader can decode only the views
  it samples (``per_view(key)``): ``view_rgb`` JPEG (quality 90), ``view_depth`` 16-bit PNG in
  millimetres (0 = invalid), ``view_label`` 8-bit PNG, ``view_region_<m>`` ``.npy`` of int32
  (lossless; region ids may exceed 16 bits);
- every other array (coord, color, normal, label, instance, tags, view_pose, view_intrinsics,
  view_frame, region_<m>, any extra array a dataset adds): binary holding the ``.npy`` encoding
  of the array (dtype and shape travel with it, exact), compressed by Parquet (zstd).

Writes are atomic (a hidden temp file in the same folder, then ``os.replace``), so a reader
never sees a half-written shard under a scene's name.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import io
import json
import platform
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import rayseg
from rayseg.atomic import TEMP_SUFFIX, atomic_path  # noqa: F401 - re-exported for the jobs
from rayseg.data.scene import GT_KEYS, PROFILES, SceneError, validate_scene

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".parquet"
JPEG_QUALITY = 90

# Ground-truth columns: read only by evaluation (scene.GT_KEYS).
GT_COLUMNS = tuple(GT_KEYS)

# Columns that describe the row but are not scene keys.
BOOKKEEPING_COLUMNS = ("schema_version", "num_points", "num_views", "image_height", "image_width")

# Views stored as one encoded image per view.
IMAGE_COLUMNS = ("view_rgb", "view_depth", "view_label")


def per_view(key: str) -> bool:
    """True for columns stored as a list with one value per view (images and view regions):
    a reader may keep only the sampled views' values before ``row_to_scene``."""
    return key in IMAGE_COLUMNS or key.startswith("view_region_")

# dtypes of the scene contract; region_* / view_region_* are int32 too.
CONTRACT_DTYPES = {
    "coord": np.float32, "color": np.uint8, "normal": np.float32, "label": np.uint8,
    "instance": np.int32, "tags": np.uint8, "view_rgb": np.uint8, "view_depth": np.float32,
    "view_pose": np.float32, "view_intrinsics": np.float32, "view_frame": np.int32,
    "view_label": np.uint8,
}
# Fixed leading order of columns in a file (the rest follow sorted by name).
COLUMN_ORDER = ("scene_id", "split") + BOOKKEEPING_COLUMNS + (
    "coord", "color", "normal", "tags", "label", "instance", "view_rgb", "view_depth",
    "view_pose", "view_intrinsics", "view_frame", "view_label")
REQUIRED_COLUMNS = ("scene_id", "split") + BOOKKEEPING_COLUMNS + ("coord", "color", "tags")

_INT_TYPES = {"schema_version": pa.int32(), "num_points": pa.int64(), "num_views": pa.int32(),
              "image_height": pa.int32(), "image_width": pa.int32()}


class ShardError(ValueError):
    """A shard, a dataset folder or its manifest is missing, unreadable or malformed."""


# --------------------------------------------------------------------------------------------
# Encoding a scene into one row, and back
# --------------------------------------------------------------------------------------------


def _contract_dtype(key: str) -> Any:
    if key.startswith("region_") or key.startswith("view_region_"):
        return np.int32
    return CONTRACT_DTYPES.get(key)


def _conform(sid: str, key: str, value: Any) -> np.ndarray:
    """value as the contract dtype of key; lossless integer casts only, floats become float32."""
    arr = np.asarray(value)
    want = _contract_dtype(key)
    if want is None or arr.dtype == want:
        return np.ascontiguousarray(arr)
    want = np.dtype(want)
    if want.kind == "f" and arr.dtype.kind in "fiu":
        return np.ascontiguousarray(arr, dtype=want)
    if want.kind in "iu" and arr.dtype.kind in "iub":
        cast = arr.astype(want)
        if np.array_equal(cast, arr):
            return np.ascontiguousarray(cast)
        raise SceneError(f"scene {sid}: {key}: values do not fit {want} (got {arr.dtype}, "
                         f"range {arr.min()}..{arr.max()})")
    raise SceneError(f"scene {sid}: {key}: expected dtype {want}, got {arr.dtype}")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npy_array(data: Any, where: str) -> np.ndarray:
    if isinstance(data, np.ndarray) and data.dtype.kind == "S":
        # numpy's fixed-width bytes drop trailing NUL bytes; the payload would be corrupt.
        raise ShardError(f"{where}: binary value arrived as a numpy bytes array (trailing NULs lost); "
                         "read it as Python bytes")
    try:
        return np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any decode failure means a corrupt value
        raise ShardError(f"{where}: cannot decode array ({type(exc).__name__}: {exc})") from None


def _encode_view(key: str, img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    if key.startswith("view_region_"):
        return _npy_bytes(img)
    if key == "view_rgb":
        Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
    elif key == "view_depth":
        # metres -> uint16 millimetres; invalid (<= 0, non-finite) and out-of-range (> 65.534 m)
        # depths become 0, the invalid marker.
        mm = np.where(np.isfinite(img), np.rint(img * 1000.0), 0.0)
        mm = np.where((mm > 0) & (mm <= 65534), mm, 0).astype(np.uint16)
        Image.fromarray(mm).save(buf, format="PNG")
    else:  # view_label
        Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _decode_view(key: str, data: Any, where: str) -> np.ndarray:
    if key.startswith("view_region_"):
        return _npy_array(data, where)
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
            if key == "view_rgb":
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
            if key == "view_depth":
                return np.asarray(im, dtype=np.uint16).astype(np.float32) / np.float32(1000.0)
            return np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - any decode failure means a corrupt image
        raise ShardError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None


def scene_to_row(scene: dict) -> dict:
    """Encode a scene record (rayseg/data/scene.py) as one shard row (plain Python values).

    Validates the scene first; arrays are cast to the contract dtypes where that is lossless
    (float arrays become float32), otherwise SceneError names the scene and key."""
    validate_scene(scene)
    sid = str(scene["scene_id"])
    _check_scene_id(sid)
    coord = np.asarray(scene["coord"])
    has_views = "view_rgb" in scene
    v, h, w = (scene["view_rgb"].shape[:3] if has_views else (0, 0, 0))
    if has_views and v > 0 and (h == 0 or w == 0):
        raise SceneError(f"scene {sid}: view_rgb: views have zero area ({h}x{w})")
    row: dict[str, Any] = {
        "scene_id": sid, "split": str(scene["split"]), "schema_version": SCHEMA_VERSION,
        "num_points": int(coord.shape[0]), "num_views": int(v),
        "image_height": int(h), "image_width": int(w),
    }
    for key, value in scene.items():
        if key in ("scene_id", "split"):
            continue
        if key in BOOKKEEPING_COLUMNS:
            raise SceneError(f"scene {sid}: {key}: reserved shard column name, not a scene key")
        if isinstance(value, str):
            row[key] = value
            continue
        if not isinstance(value, (np.ndarray, np.generic, list, tuple, int, float)):
            raise SceneError(f"scene {sid}: {key}: cannot store a {type(value).__name__}")
        arr = _conform(sid, key, value)
        if per_view(key):
            if key != "view_rgb" and arr.shape != (v, h, w):
                raise SceneError(f"scene {sid}: {key}: expected shape {(v, h, w)}, got {arr.shape}")
            row[key] = [_encode_view(key, img) for img in arr]
        else:
            row[key] = _npy_bytes(arr)
    return row


def _value(row: dict, key: str) -> Any:
    value = row[key]
    return value.item() if isinstance(value, np.generic) else value


def row_to_scene(row: dict, columns: list[str] | None = None) -> dict:
    """Decode one shard row into a scene record.

    ``row`` may come from pyarrow (``to_pylist``: bytes, lists) or from Ray Data
    (``read_parquet(...).map(row_to_scene)``: numpy scalars, object arrays). ``columns``
    restricts decoding to those scene keys (scene_id and split are always returned), e.g.
    ``without_gt(...)`` for training. Bookkeeping columns are not scene keys and are dropped."""
    for key in ("scene_id", "split"):
        if key not in row:
            raise ShardError(f"shard row has no {key!r} column (always read scene_id and split)")
    sid = str(_value(row, "scene_id"))
    version = _value(row, "schema_version") if "schema_version" in row else SCHEMA_VERSION
    if version != SCHEMA_VERSION:
        raise ShardError(f"scene {sid}: shard schema version {version}, this rayseg reads "
                         f"version {SCHEMA_VERSION}: re-run `rayseg prepare`")
    if columns is None:
        keys = [k for k in row if k not in BOOKKEEPING_COLUMNS and k not in ("scene_id", "split")]
    else:
        keys = [k for k in columns if k not in BOOKKEEPING_COLUMNS and k not in ("scene_id", "split")]
        missing = [k for k in keys if k not in row]
        if missing:
            raise ShardError(f"scene {sid}: column(s) {missing} not in the shard row "
                             f"(has {sorted(row)})")
    scene: dict[str, Any] = {"scene_id": sid, "split": str(_value(row, "split"))}
    for key in keys:
        where = f"scene {sid}: {key}"
        value = _value(row, key)
        if isinstance(value, str):
            scene[key] = value
        elif per_view(key) and isinstance(value, (bytes, bytearray)):
            scene[key] = _npy_array(value, where)  # one whole-array value (early shards did this)
        elif per_view(key):
            images = [_decode_view(key, data, f"{where}[{i}]") for i, data in enumerate(value)]
            if images:
                shapes = {img.shape[:2] for img in images}
                if len(shapes) != 1:
                    raise ShardError(f"{where}: views have different sizes {sorted(shapes)}")
                scene[key] = np.stack(images)
            else:
                h, w = (int(row.get(k) or 0) for k in ("image_height", "image_width"))
                shape = (0, h, w, 3) if key == "view_rgb" else (0, h, w)
                scene[key] = np.zeros(shape, dtype=_contract_dtype(key))
        else:
            scene[key] = _npy_array(value, where)
    return scene


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _check_scene_id(sid: str) -> None:
    if not sid or sid.startswith(".") or "/" in sid or "\\" in sid or sid != sid.strip():
        raise SceneError(f"scene {sid!r}: scene_id: must be a plain file name "
                         "(no slashes, no leading dot, no surrounding spaces)")


def scene_path(root: str | Path, split: str, scene_id: str) -> Path:
    """Where a scene's shard lives: ROOT/<split>/<scene_id>.parquet."""
    return Path(root) / split / f"{scene_id}{SHARD_SUFFIX}"


def _arrow_type(key: str, value: Any) -> pa.DataType:
    if key in _INT_TYPES:
        return _INT_TYPES[key]
    if isinstance(value, str):
        return pa.string()
    if isinstance(value, list):
        return pa.list_(pa.binary())
    return pa.binary()


def _ordered(keys: Iterable[str]) -> list[str]:
    keys = list(keys)
    head = [k for k in COLUMN_ORDER if k in keys]
    return head + sorted(k for k in keys if k not in COLUMN_ORDER)


def _row_table(row: dict, metadata: dict | None = None) -> pa.Table:
    names = _ordered(row)
    schema = pa.schema([pa.field(k, _arrow_type(k, row[k])) for k in names],
                       metadata=metadata or {b"rayseg.schema_version": str(SCHEMA_VERSION).encode()})
    return pa.Table.from_pylist([row], schema=schema)


def _write_table(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        # Blobs gain nothing from dictionaries or min/max statistics; zstd shrinks the npy arrays.
        # Page CRCs let a read detect flipped bytes even inside tolerant payloads (JPEG).
        pq.write_table(table, tmp, compression="zstd", use_dictionary=False, write_statistics=False,
                       write_page_checksum=True)


def write_scene(root: str | Path, scene: dict) -> Path:
    """Validate, encode and atomically write one scene to ROOT/<split>/<scene_id>.parquet."""
    row = scene_to_row(scene)
    path = scene_path(root, row["split"], row["scene_id"])
    _write_table(_row_table(row), path)
    return path


def _read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} does not exist")
    try:
        table = pq.ParquetFile(path, page_checksum_verification=True).read(columns=columns)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise ShardError(f"shard {path}: unreadable parquet ({type(exc).__name__}: {exc})") from None
    if table.num_rows != 1:
        raise ShardError(f"shard {path}: expected exactly 1 row, found {table.num_rows}")
    return table


def _table_row(table: pa.Table) -> dict:
    return {name: table.column(name)[0].as_py() for name in table.column_names}


def read_scene(path: str | Path, columns: list[str] | None = None) -> dict:
    """Read and decode one shard. ``columns`` restricts the scene keys read (scene_id and split
    are always read); errors name the file."""
    read_cols = None
    if columns is not None:
        read_cols = _ordered(set(columns) | {"scene_id", "split", "schema_version",
                                              "image_height", "image_width"})
        available = shard_columns(path)
        missing = [c for c in read_cols if c not in available]
        if missing:
            raise ShardError(f"shard {path}: column(s) {missing} not present (has {available})")
    row = _table_row(_read_table(path, read_cols))
    try:
        return row_to_scene(row, columns)
    except ShardError as exc:
        raise ShardError(f"shard {path}: {exc}") from None


def shard_columns(path: str | Path) -> list[str]:
    """Column names of a shard (reads only the footer)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} does not exist")
    try:
        return list(pq.read_schema(path).names)
    except Exception as exc:  # noqa: BLE001
        raise ShardError(f"shard {path}: unreadable parquet ({type(exc).__name__}: {exc})") from None


def without_gt(columns: Iterable[str]) -> list[str]:
    """The columns minus the ground-truth ones (label, instance, view_label): what training,
    pseudo-labelling and partitions may read."""
    return [c for c in columns if c not in GT_COLUMNS]


def update_scene(path: str | Path, new_values: dict) -> None:
    """Atomically rewrite one shard, adding or replacing columns (e.g. region_<m>,
    view_region_<m>). Other columns are copied untouched (no JPEG re-encoding). Afterwards the
    manifest entry is stale: call ``refresh_manifest_entry(root, path)`` (or write_manifest)."""
    path = Path(path)
    table = _read_table(path)
    meta = _table_row(table.select([c for c in ("scene_id", "num_points", "num_views",
                                                "image_height", "image_width")
                                     if c in table.column_names]))
    sid = meta.get("scene_id", path.stem)
    n, v = meta.get("num_points"), meta.get("num_views")
    h, w = meta.get("image_height"), meta.get("image_width")
    new_row: dict[str, Any] = {}
    for key, value in new_values.items():
        if key in ("scene_id", "split") or key in BOOKKEEPING_COLUMNS:
            raise SceneError(f"scene {sid}: {key}: cannot be changed by update_scene")
        if isinstance(value, str):
            new_row[key] = value
            continue
        arr = _conform(sid, key, value)
        if key.startswith("region_") or key in ("label", "instance"):
            expect = (n,)
        elif key.startswith("view_region_") or key in ("view_depth", "view_label"):
            expect = (v, h, w)
        elif key in ("coord", "color", "normal"):
            expect = (n, 3)
        else:
            expect = arr.shape
        if arr.shape != tuple(expect):
            raise SceneError(f"scene {sid}: {key}: expected shape {tuple(expect)}, got {arr.shape} "
                             f"(shard {path})")
        new_row[key] = [_encode_view(key, img) for img in arr] if per_view(key) else _npy_bytes(arr)
    for key, value in new_row.items():
        column = pa.array([value], type=_arrow_type(key, value))
        if key in table.column_names:
            table = table.set_column(table.column_names.index(key), key, column)
        else:
            table = table.append_column(pa.field(key, column.type), column)
    table = table.select(_ordered(table.column_names))
    _write_table(table, path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset path {root} is not a folder")
    return root


def load_manifest(root: str | Path) -> dict:
    """The dataset's manifest; errors name the folder or file."""
    root = _check_root(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a prepared rayseg dataset "
                                "(run `rayseg prepare ...` first)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or "scenes" not in manifest:
        raise ShardError(f"{path}: not a rayseg manifest (no 'scenes' list)")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema version {version}, this rayseg reads version "
                         f"{SCHEMA_VERSION}: re-run `rayseg prepare`")
    return manifest


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def _manifest_lock(root: Path) -> Iterator[None]:
    # Serialises read-modify-write of the manifest between processes on one machine.
    with open(root / ".manifest.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _file_entry(root: Path, path: Path, cached: dict | None) -> dict:
    """Manifest entry of one shard; the sha256 is reused when size and mtime are unchanged."""
    stat = path.stat()
    unchanged = cached and cached.get("bytes") == stat.st_size and cached.get("mtime_ns") == stat.st_mtime_ns
    if unchanged and "num_tags" in cached:
        return cached
    # (an entry of an older manifest lacks the class count: read it, keep the checksum)
    return {**shard_facts(root, path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": cached["sha256"] if unchanged else sha256_file(path)}


def shard_facts(root: Path, path: Path) -> dict:
    """What a shard says about itself (scene, split, sizes, class count, schema, regions), read
    from its small columns only; ``missing_columns`` lists absent required columns."""
    columns = shard_columns(path)
    table = _read_table(path, [c for c in ("scene_id", "split", "schema_version", "num_points", "num_views",
                                           "tags") if c in columns])
    row = _table_row(table)
    tags = _npy_array(row["tags"], f"shard {path}: tags") if "tags" in row else None
    return {
        "path": path.relative_to(root).as_posix(), "scene_id": row.get("scene_id", path.stem),
        "split": row.get("split", path.parent.name),
        "num_points": row.get("num_points"), "num_views": row.get("num_views"),
        "num_tags": None if tags is None else int(tags.shape[0]),
        "schema_version": row.get("schema_version"),
        "regions": sorted(c[len("region_"):] for c in columns if c.startswith("region_")),
        "missing_columns": [c for c in REQUIRED_COLUMNS if c not in columns],
    }


def foreign_shards(root: str | Path, profile: str, skip: set[str] = frozenset()) -> list[str]:
    """'<rel path>: why' for each shard in ROOT (except the ``skip`` relative paths) that does not
    belong in a ``profile`` dataset (see _foreign_reason), or does not read."""
    root = Path(root)
    out = []
    for path in _disk_shards(root):
        rel = path.relative_to(root).as_posix()
        if rel in skip:
            continue
        try:
            why = _foreign_reason(shard_facts(root, path), profile)
        except (ShardError, OSError) as exc:
            why = f"unreadable ({exc})"
        if why:
            out.append(f"{rel}: {why}")
    return out


def _foreign_reason(entry: dict, profile: str) -> str:
    """Why a shard's manifest entry does not belong in a ``profile`` dataset ('' = it does): another
    class set, another schema, required columns missing, or a path that names another scene."""
    num_classes = len(PROFILES.get(profile, ())) or None
    if entry.get("missing_columns"):
        return f"not a rayseg scene shard (lacks column(s) {entry['missing_columns']})"
    if entry.get("schema_version") != SCHEMA_VERSION:
        return f"shard schema version {entry.get('schema_version')}, this dataset is version {SCHEMA_VERSION}"
    if num_classes is not None and entry.get("num_tags") != num_classes:
        return (f"{entry.get('num_tags')} class tags, but this is a {profile} dataset ({num_classes} classes): "
                "a scene of another class set")
    stem, split = Path(entry["path"]).stem, Path(entry["path"]).parent.name
    if entry.get("scene_id") != stem or entry.get("split") != split:
        return (f"holds scene {entry.get('scene_id')!r} of split {entry.get('split')!r}, but its path says "
                f"{stem!r} of {split!r}")
    return ""


def _disk_shards(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"*/*{SHARD_SUFFIX}") if not p.name.startswith("."))


def _temp_files(root: Path) -> list[Path]:
    return sorted(root.glob(f"*/.*{TEMP_SUFFIX}")) + sorted(root.glob(f".*{TEMP_SUFFIX}"))


def _finish_manifest(root: Path, manifest: dict) -> None:
    entries = sorted(manifest["scenes"], key=lambda e: e["path"])
    manifest["scenes"] = entries
    manifest["splits"] = dict(sorted(Counter(e["split"] for e in entries).items()))
    manifest["num_scenes"] = len(entries)
    manifest["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def write_manifest(root: str | Path, profile: str | None, metadata: dict | None = None) -> dict:
    """Scan ROOT/*/*.parquet and write ROOT/manifest.json atomically; returns the manifest.

    ``profile`` names the class set (rayseg.data.scene.PROFILES); ``None`` keeps the existing
    manifest's profile. ``metadata`` is a dataset-specific dict (e.g. {"coordinates":
    "axis_aligned"}); ``None`` keeps the existing metadata. Checksums of files whose size and
    mtime match the existing manifest are reused (``verify`` always recomputes them)."""
    root = _check_root(root)
    with _manifest_lock(root):
        old: dict = {}
        if (root / MANIFEST_NAME).is_file():
            with contextlib.suppress(ShardError, FileNotFoundError):
                old = load_manifest(root)
        profile = profile if profile is not None else old.get("profile")
        if profile not in PROFILES:
            raise ShardError(f"{root}: dataset profile must be one of {sorted(PROFILES)}, got {profile!r}")
        cache = {e["path"]: e for e in old.get("scenes", [])}
        entries = [_file_entry(root, p, cache.get(p.relative_to(root).as_posix()))
                   for p in _disk_shards(root)]
        # A shard of another dataset dropped into the folder must not join it silently: training
        # would fail much later on mismatched shapes, naming no file.
        foreign = [f"{e['path']}: {why}" for e in entries if (why := _foreign_reason(e, profile))]
        if foreign:
            raise ShardError(f"{root}: refusing to list {len(foreign)} foreign file(s) in the manifest "
                             "(move them out of the dataset folder, or prepare them into their own):\n  "
                             + "\n  ".join(foreign))
        for e in entries:
            e.pop("missing_columns", None)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "profile": profile,
            "class_names": list(PROFILES[profile]),
            "num_classes": len(PROFILES[profile]),
            "splits": {}, "num_scenes": 0,
            "metadata": dict(metadata) if metadata is not None else old.get("metadata", {}),
            "created": old.get("created") or {
                "time": now, "rayseg_version": rayseg.__version__, "host": socket.gethostname(),
                "python": platform.python_version(), "pyarrow": pa.__version__,
            },
            "scenes": entries,
        }
        _finish_manifest(root, manifest)
    return manifest


def refresh_manifest_entry(root: str | Path, path: str | Path) -> dict:
    """Recompute one file's manifest entry (after update_scene) and rewrite the manifest.

    Safe to call from several processes on one machine (file lock); on a cluster prefer
    calling it (or write_manifest) from the driver."""
    root = _check_root(root)
    path = Path(path)
    path = path if path.is_absolute() or path.exists() else root / path
    with _manifest_lock(root):
        manifest = load_manifest(root)
        if not path.resolve().is_relative_to(root.resolve()):
            raise ShardError(f"{path} is not a shard of the dataset {root}")
        rel = path.resolve().relative_to(root.resolve()).as_posix()
        entry = _file_entry(root.resolve(), path.resolve(), None)
        if why := _foreign_reason(entry, manifest["profile"]):
            raise ShardError(f"{path}: {why}; refusing to list it in {root / MANIFEST_NAME}")
        entry.pop("missing_columns", None)
        manifest["scenes"] = [e for e in manifest["scenes"] if e["path"] != rel] + [entry]
        _finish_manifest(root, manifest)
    return entry


def check_listed_files(root: str | Path, entries: list[dict], manifest: dict | None = None) -> None:
    """Raise naming the first bad file when a manifest entry's shard is missing, has another size
    than the manifest records (truncated, or rewritten since), or has another class count: cheap
    (one stat per file), so every reader can run it before Ray reads the shards and fails with
    an error that names no file."""
    root = Path(root)
    num_classes = (manifest or {}).get("num_classes")
    for e in entries:
        p = root / e["path"]
        if not p.is_file():
            raise FileNotFoundError(f"shard {p} listed in {root / MANIFEST_NAME} does not exist "
                                    f"(run `rayseg inspect --verify {root}`)")
        size = p.stat().st_size
        if e.get("bytes") is not None and size != e["bytes"]:
            raise ShardError(f"shard {p}: {size} bytes, {root / MANIFEST_NAME} says {e['bytes']}: truncated "
                             f"or rewritten since the manifest was written (run `rayseg inspect --verify {root}`)")
        if num_classes is not None and e.get("num_tags") not in (None, num_classes):
            raise ShardError(f"shard {p}: {e['num_tags']} class tags, the dataset has {num_classes} classes: "
                             "a scene of another class set (move it out and re-run prepare)")


def scene_paths(root: str | Path, split: str | None = None, check_sizes: bool = True) -> list[Path]:
    """Shard paths of a dataset (all splits, or one), from its manifest, sorted.

    Missing folder / manifest / shard -> FileNotFoundError naming it; a shard whose size differs
    from the manifest's (truncated; ``check_sizes``) or whose class count differs -> ShardError
    naming it; no scenes in the requested split -> ShardError naming the folder and split.
    ``check_sizes=False`` is for jobs that rewrite shards and then refresh the manifest
    (partition), which must work on a manifest left stale by a kill between the two writes."""
    root = Path(root)
    manifest = load_manifest(root)
    entries = [e for e in manifest["scenes"] if split is None or e["split"] == split]
    if not entries:
        have = manifest.get("splits", {})
        raise ShardError(f"{root}: no scenes in split {split!r} (manifest has {have or 'no scenes'})"
                         if split else f"{root}: dataset has no scenes")
    if check_sizes:
        check_listed_files(root, entries, manifest)
    paths = [root / e["path"] for e in entries]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"shard {p} listed in {root / MANIFEST_NAME} does not exist "
                                    "(run `rayseg inspect --verify`)")
    return paths


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def _schema_problems(path: Path, schema: pa.Schema) -> list[str]:
    problems = []
    names = schema.names
    for col in REQUIRED_COLUMNS:
        if col not in names:
            problems.append(f"missing column {col!r}")
    for field in schema:
        if field.name in _INT_TYPES:
            ok = pa.types.is_integer(field.type)
        elif field.name in ("scene_id", "split"):
            ok = pa.types.is_string(field.type)
        elif per_view(field.name):
            ok = pa.types.is_list(field.type) and pa.types.is_binary(field.type.value_type)
        else:
            ok = pa.types.is_binary(field.type) or pa.types.is_string(field.type)
        if not ok:
            problems.append(f"column {field.name!r} has type {field.type}")
    return problems


def verify_shard(path: str | Path, num_classes: int | None = None) -> list[str]:
    """Problems of one shard file (unreadable, bad schema, undecodable values, contract
    violations, path not matching its scene id/split); [] when it is sound."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001
        return [f"unreadable or truncated parquet ({type(exc).__name__}: {exc})"]
    problems = _schema_problems(path, schema)
    if problems:
        return ["bad schema: " + "; ".join(problems)]
    try:
        scene = read_scene(path)
        validate_scene(scene, num_classes)
    except (ShardError, SceneError, OSError) as exc:
        return [str(exc).replace(f"shard {path}: ", "")]
    if scene["scene_id"] != path.stem or scene["split"] != path.parent.name:
        return [f"holds scene {scene['scene_id']!r} of split {scene['split']!r}, "
                f"but its path says {path.stem!r} of {path.parent.name!r}"]
    return []


def verify(root: str | Path, progress_seconds: float = 0.0) -> list[str]:
    """Every problem of a prepared dataset, each naming the file: missing / extra / leftover
    temp files, size or checksum mismatches, unreadable or truncated Parquet, bad schema,
    scene contract violations. [] means the dataset is sound. Re-reads every byte.
    ``progress_seconds`` > 0 prints a progress line that often."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: dataset folder does not exist"]
    try:
        manifest = load_manifest(root)
    except (FileNotFoundError, ShardError) as exc:
        return [str(exc)]
    problems: list[str] = []
    num_classes = manifest.get("num_classes")
    listed = {e["path"]: e for e in manifest["scenes"]}
    if not listed:
        problems.append(f"{MANIFEST_NAME}: lists no scenes (did every scene fail to prepare? re-run prepare)")
    on_disk = {p.relative_to(root).as_posix() for p in _disk_shards(root)}
    for rel in sorted(on_disk - set(listed)):
        try:
            why = _foreign_reason(_file_entry(root, root / rel, None), manifest.get("profile"))
        except (ShardError, OSError) as exc:
            why = f"unreadable ({exc})"
        problems.append(f"{rel}: extra file not in the manifest, " + (
            f"foreign to this dataset: {why}; move it out of the folder" if why
            else "a sound scene of this dataset (re-run prepare to list it)"))
    for tmp in _temp_files(root):
        problems.append(f"{tmp.relative_to(root).as_posix()}: leftover temp file of an interrupted write")
    last_print = time.time()
    for done, (rel, entry) in enumerate(sorted(listed.items())):
        if progress_seconds > 0 and time.time() - last_print >= progress_seconds:
            print(f"verify: {done}/{len(listed)} files checked, {len(problems)} problem(s) so far", flush=True)
            last_print = time.time()
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing (listed in the manifest)")
            continue
        size = path.stat().st_size
        if size != entry.get("bytes"):
            hint = "truncated or rewritten"
            with contextlib.suppress(ShardError, OSError):
                have = sorted(c[len("region_"):] for c in shard_columns(path) if c.startswith("region_"))
                if have != sorted(entry.get("regions", [])):
                    hint = (f"the shard has regions {have}, the manifest lists {entry.get('regions', [])}: "
                            "a partition run was stopped before it refreshed the manifest; re-run "
                            "`rayseg partition` to repair it")
            problems.append(f"{rel}: size {size} bytes, manifest says {entry.get('bytes')} ({hint})")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{rel}: checksum mismatch (sha256 differs from the manifest)")
        problems += [f"{rel}: {p}" for p in verify_shard(path, num_classes)]
    counts = dict(sorted(Counter(e["split"] for e in manifest["scenes"]).items()))
    if manifest.get("splits") != counts:
        problems.append(f"{MANIFEST_NAME}: split counts {manifest.get('splits')} do not match its file list {counts}")
    return problems
