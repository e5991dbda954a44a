"""`rayseg partition`: add region_<m> / view_region_<m> columns to every scene of a dataset.

One Ray task per scene reads the columns it needs (never GT, except `instance` for the gt
oracle), computes every requested method, and rewrites the scene's shard atomically
(rayseg.data.shards.update_scene). The driver prints progress, collects per-scene failures
(a failing scene is reported by name, the others complete) and records what it wrote in the
sidecar ``ROOT/partitions.json``:

    {"methods": {m: {"params": {...}, "hash": h, "oracle": bool}},
     "scenes": {"<split>/<scene_id>.parquet": {m: h}}}

A scene is skipped for method m when its shard already has region_<m> (and view_region_<m> if
it has views) and the sidecar records the same parameter hash (rayseg.partition.params_hash),
so re-running the same command is a no-op and changing a parameter recomputes. The sidecar is
saved every few seconds and at the end; a scene written but not yet recorded is just recomputed
next time. The manifest is refreshed (checksums, region lists) at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from rayseg import config as cfgmod
from rayseg.data import shards
from rayseg.data.prepare import PrepareSummary
from rayseg.partition import (ALL_METHODS, GT_METHOD, METHODS, MIN_SIZE_KEYS, PartitionError,
                              area_per_point, check_method, geometry, gt, is_oracle, method_params,
                              min_size_warning, params_hash, partition_points, views)

SIDECAR = "partitions.json"
COLOR_METHODS = ("vccs", "vccs_rg")  # the only methods that read colours


def column_names(method: str) -> tuple[str, str]:
    return f"region_{method}", f"view_region_{method}"


def partition_scene(scene: dict, methods: list[str], cfg: cfgmod.PartitionConfig) -> dict:
    """New columns {region_<m>: (N,) int32, view_region_<m>: (V,H,W) int32} for one scene.

    Reads coord, color, normal and the views; the gt oracle also reads ``instance`` (GT)."""
    sid = scene.get("scene_id", "<no scene_id>")
    if "coord" not in scene:
        raise PartitionError(f"scene {sid}: coord: missing")
    coord = np.asarray(scene["coord"])
    normal = scene.get("normal")
    if normal is not None and not np.any(normal):
        normal = None  # all zeros = unknown: estimated
    depth = scene.get("view_depth")  # view_rgb is only read by the methods that use colour
    v = 0 if depth is None else int(depth.shape[0])
    if v:
        h, w = depth.shape[1:3]
        if h == 0 or w == 0:
            raise PartitionError(f"scene {sid}: view_depth: views have zero area ({h}x{w} pixels)")
    out: dict[str, np.ndarray] = {}
    for method in methods:
        check_method(method)
        col, view_col = column_names(method)
        if method == GT_METHOD:
            if "instance" not in scene:
                raise PartitionError(f"scene {sid}: gt oracle needs the ground-truth 'instance' column")
            geometry.check_points(coord, None, None, f"scene {sid}")
            out[col] = gt.partition(scene["instance"])
        else:
            out[col] = partition_points(method, coord, scene.get("color"), normal, cfg,
                                        name=f"scene {sid}")
        if not v:
            continue
        regions = []
        for i in range(v):
            view_depth, pose, K = depth[i], scene["view_pose"][i], scene["view_intrinsics"][i]
            if method == GT_METHOD:
                world, valid = views.backproject(view_depth, pose, K, f"scene {sid} view {i}")
                if not np.isfinite(pose).all():  # pixels cannot be matched to world points
                    valid = np.zeros_like(valid)
                regions.append(gt.view_partition(world, valid, coord, out[col], cfg.gt_view_tolerance))
            else:
                rgb = scene["view_rgb"][i] if "view_rgb" in scene else None
                regions.append(views.view_regions(method, rgb, view_depth, pose, K, cfg,
                                                  name=f"scene {sid} view {i}"))
        out[view_col] = np.stack(regions).astype(np.int32)
    return out


def _needed_columns(path: Path, methods: list[str]) -> list[str]:
    have = set(shards.shard_columns(path))
    want = ["coord", "color", "normal", "view_depth", "view_pose", "view_intrinsics"]
    if any(m in COLOR_METHODS for m in methods):
        want.append("view_rgb")
    if GT_METHOD in methods:
        want.append("instance")  # ground truth, read only for the oracle
    return [c for c in want if c in have]


def partition_file(path: str, methods: list[str], cfg_dict: dict) -> dict:
    """Ray task body: partition one shard in place. Never raises: failures come back as
    {"status": "failed", "error": ...} naming the scene."""
    start = time.perf_counter()
    sid = Path(path).stem
    try:
        cfg = cfgmod.build({f"partition.{k}": v for k, v in cfg_dict.items()}).partition
        scene = shards.read_scene(path, _needed_columns(Path(path), methods))
        sid = scene["scene_id"]
        values = partition_scene(scene, methods, cfg)
        shards.update_scene(path, values)
        regions = {m: int(values[column_names(m)[0]].max()) + 1 for m in methods}
        # the density decides what a minimum region size in points means (run_partition warns)
        per_point = area_per_point(scene["coord"], cfg) if any(m in MIN_SIZE_KEYS for m in methods) else None
        return {"status": "written", "scene_id": sid, "path": path, "methods": methods,
                "regions": regions, "area_per_point": per_point, "seconds": time.perf_counter() - start}
    except Exception as exc:  # noqa: BLE001 - one bad scene must not stop the others
        detail = "" if isinstance(exc, (PartitionError, shards.ShardError, ValueError, OSError)) \
            else "\n" + traceback.format_exc(limit=4)
        return {"status": "failed", "scene_id": sid, "path": path, "methods": methods,
                "error": f"{type(exc).__name__}: {exc}{detail}"}


@dataclass
class PartitionSummary(PrepareSummary):
    """What a partition run did (PrepareSummary's fields, plus the methods run)."""

    JOB: ClassVar[str] = "partition"
    SKIPPED: ClassVar[str] = "up to date"
    DONE: ClassVar[str] = "done"

    methods: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def subject(self) -> str:
        names = ", ".join(f"{m} [{gt.ORACLE_NOTE}]" if is_oracle(m) else m for m in self.methods)
        return f"{self.root}: {names}"

    def format(self) -> str:
        return "\n".join([super().format()] + [f"  WARNING {w}" for w in self.warnings])


def _stale_manifest_entries(root: Path, paths: list[Path], entries: dict) -> list[str]:
    """Scenes whose manifest entry no longer describes their shard (size or region list)."""
    stale = []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        entry = entries.get(rel, {})
        regions = sorted(c[len("region_"):] for c in shards.shard_columns(path) if c.startswith("region_"))
        if entry.get("bytes") != path.stat().st_size or sorted(entry.get("regions", [])) != regions:
            stale.append(rel)
    return stale


def verify_partitions(root: str | Path, methods: list[str] | None = None, coverage: bool = True) -> list[str]:
    """Problems of a dataset's partitions, each naming the scene file and the method: a region
    column with no record of the parameters that made it, or made with other parameters than
    the rest (a run with new parameters that did not finish), a column on some scenes only, a
    point column without its view column, a record whose column is gone. [] when sound, and
    when the dataset has no partitions.json (its region columns, if any, were written by its
    preparer, not by `rayseg partition`). ``methods`` restricts the check to those methods;
    ``coverage=False`` skips the "on some scenes only" check (readers check their split)."""
    root = Path(root)
    manifest = shards.load_manifest(root)
    if not (root / SIDECAR).is_file():
        return []  # no partition run here: region columns (if any) came with the dataset itself
    try:
        sidecar = load_sidecar(root)
    except shards.ShardError as exc:
        return [str(exc)]
    problems: list[str] = []
    have: dict[str, list[str]] = {}  # method -> scenes (rel paths) that carry it
    entries = manifest["scenes"]
    for entry in entries:
        rel, path = entry["path"], root / entry["path"]
        try:
            columns = set(shards.shard_columns(path))
        except (FileNotFoundError, shards.ShardError):
            continue  # the dataset check reports the file itself
        record = sidecar["scenes"].get(rel, {})
        for col in sorted(c for c in columns if c.startswith("region_")):
            m = col[len("region_"):]
            if methods is not None and m not in methods:
                continue
            have.setdefault(m, []).append(rel)
            want = sidecar["methods"].get(m, {}).get("hash")
            if want is None or m not in record:
                problems.append(f"{rel}: {col}: {SIDECAR} has no record of the parameters that made it "
                                f"(re-run `rayseg partition {root} --method {m} --force`)")
            elif record[m] != want:
                problems.append(f"{rel}: {col}: made with other parameters ({record[m]}) than {SIDECAR} records "
                                f"for {m} ({want}): a partition run with new parameters did not finish; re-run it")
            if entry.get("num_views") and f"view_{col}" not in columns:
                problems.append(f"{rel}: {col} without view_{col} (re-run `rayseg partition`)")
        for m in sorted(set(record) - {c[len("region_"):] for c in columns if c.startswith("region_")}
                        - (set() if methods is None else set(record) - set(methods))):
            problems.append(f"{rel}: {SIDECAR} records region_{m} but the shard lacks it (re-prepared since?); "
                            f"re-run `rayseg partition {root} --method {m}`")
    for m, rels in sorted(have.items()):
        if coverage and len(rels) < len(entries):
            lacking = sorted(set(e["path"] for e in entries) - set(rels))
            problems.append(f"region_{m}: on {len(rels)} of {len(entries)} scenes, missing on "
                            f"{', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''}")
    return problems


def load_sidecar(root: Path) -> dict:
    path = root / SIDECAR
    if not path.is_file():
        return {"methods": {}, "scenes": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise shards.ShardError(f"{path}: unreadable partition record ({exc}); delete it to "
                                "recompute every partition") from None
    if not isinstance(data, dict) or not isinstance(data.get("scenes"), dict):
        raise shards.ShardError(f"{path}: not a rayseg partition record")
    data.setdefault("methods", {})
    return data


def save_sidecar(root: Path, data: dict) -> None:
    with shards.atomic_path(root / SIDECAR) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def ensure_ray(address: str = "") -> None:
    """Join cfg.ray.address, else RAY_ADDRESS, else start a local Ray (unless one is running)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:
        from rayseg.raylocal import init_local

        init_local()  # listening on 127.0.0.1 only


def run_partition(root: str | Path, methods: list[str], cfg: cfgmod.Config, force: bool = False,
                  num_cpus_per_task: float = 1.0, progress_seconds: float = 5.0) -> PartitionSummary:
    """Partition every scene of a prepared dataset with each method (module doc)."""
    methods = list(dict.fromkeys(methods))  # de-duplicated, order kept
    if not methods:
        raise PartitionError("no partition method given")
    for m in methods:
        check_method(m)
    root = Path(root)
    manifest = shards.load_manifest(root)  # missing data fails here, before Ray starts
    # Sizes unchecked: a manifest left stale by a kill between a shard rewrite and the manifest
    # refresh is what this job repairs.
    paths = shards.scene_paths(root, check_sizes=False)
    entries = {e["path"]: e for e in manifest["scenes"]}
    sidecar = load_sidecar(root)
    hashes = {m: params_hash(m, cfg.partition) for m in methods}
    for m in methods:
        sidecar["methods"][m] = {"params": method_params(m, cfg.partition), "hash": hashes[m],
                                 "oracle": is_oracle(m)}
    summary = PartitionSummary(root=root, methods=methods, total=len(paths))
    plan: list[tuple[Path, str, list[str]]] = []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        entry = entries.get(rel, {})
        have = set(shards.shard_columns(path))
        done = sidecar["scenes"].get(rel, {})
        todo = []
        for m in methods:
            col, view_col = column_names(m)
            stored = col in have and (not entry.get("num_views") or view_col in have)
            if force or not stored or done.get(m) != hashes[m]:
                todo.append(m)
        if todo:
            plan.append((path, rel, todo))
        else:
            summary.skipped.append(entry.get("scene_id", path.stem))
    start = time.time()
    if not plan:
        print(f"partition: all {len(paths)} scenes up to date for {', '.join(methods)}", flush=True)
        stale = _stale_manifest_entries(root, paths, entries)
        if stale:  # shards rewritten, manifest not refreshed (killed between the two writes)
            save_sidecar(root, sidecar)
            shards.write_manifest(root, None)
            print(f"partition: manifest refreshed: {len(stale)} scene(s) carried region columns or bytes "
                  f"it did not list (e.g. {stale[0]}; a run stopped between its two writes)", flush=True)
        summary.seconds = time.time() - start
        return summary
    for m in methods:
        if is_oracle(m):
            print(f"partition: {m}: {gt.ORACLE_NOTE} (reads the evaluation-only instance column)",
                  flush=True)

    import ray

    ensure_ray(cfg.ray.address)
    remote = ray.remote(partition_file).options(num_cpus=num_cpus_per_task, max_retries=1)
    cfg_dict = cfgmod.to_dict(cfg.partition)
    pending = {remote.remote(str(path), todo, cfg_dict): (path, rel, todo) for path, rel, todo in plan}
    per_point: list[float] = []  # area per point of each written scene, m^2
    last_print = last_save = time.time()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=progress_seconds)
            for ref in ready:
                path, rel, todo = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a crashed worker fails only its scene
                    result = {"status": "failed", "scene_id": path.stem,
                              "error": f"{type(exc).__name__}: {exc}"}
                sid = result["scene_id"]
                if result["status"] == "failed":
                    summary.failed[sid] = result["error"]
                    print(f"partition: scene {sid} FAILED: {result['error']}", file=sys.stderr, flush=True)
                    continue
                summary.written.append(sid)
                if result.get("area_per_point") is not None:
                    per_point.append(result["area_per_point"])
                sidecar["scenes"].setdefault(rel, {}).update({m: hashes[m] for m in todo})
            now = time.time()
            if now - last_save >= progress_seconds:
                save_sidecar(root, sidecar)
                last_save = now
            if now - last_print >= progress_seconds or not pending:
                done = len(plan) - len(pending)
                rate = done / max(now - start, 1e-9)
                eta = f", ETA {len(pending) / rate:.0f} s" if rate > 0 and pending else ""
                print(f"partition: {done}/{len(plan)} scenes to do ({len(summary.written)} written, "
                      f"{len(summary.failed)} failed; {len(summary.skipped)} up to date), "
                      f"{rate:.2f} scenes/s{eta}", flush=True)
                last_print = now
    finally:
        save_sidecar(root, sidecar)
        shards.write_manifest(root, None)
    summary.warnings = [w for m in methods if (w := min_size_warning(m, per_point, cfg.partition))]
    for warning in summary.warnings:
        print(f"partition: WARNING: {warning}", file=sys.stderr, flush=True)
    summary.seconds = time.time() - start
    return summary


__all__ = ["run_partition", "partition_scene", "partition_file", "PartitionSummary", "SIDECAR", "verify_partitions",
           "ALL_METHODS", "METHODS"]
