"""Prepare a dataset: one Ray task per scene writes one shard, then the driver writes the manifest.

Dataset readers (synthetic, ScanNet, S3DIS) only describe their scenes as ``SceneTask``s (an id,
a split and a picklable function that builds the scene record); ``run_prepare`` does the rest:
resumability (a shard that exists and reads back valid is skipped), validation, atomic writes,
progress lines, a per-scene failure summary and the manifest.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from rayseg.data import shards
from rayseg.data.scene import PROFILES, SceneError, validate_scene


@dataclass(frozen=True)
class SceneTask:
    """One scene to prepare. ``make`` builds the scene record (rayseg/data/scene.py) and must be
    picklable (a module-level function or functools.partial of one); it runs in a Ray worker."""

    scene_id: str
    split: str
    make: Callable[[], dict]


@dataclass
class PrepareSummary:
    """What a per-scene job (prepare; partition subclasses it) did. ``failed`` maps scene id ->
    error message."""

    JOB: ClassVar[str] = "prepare"
    SKIPPED: ClassVar[str] = "already complete"
    DONE: ClassVar[str] = "complete"

    root: Path
    total: int
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def subject(self) -> str:
        return str(self.root)

    def format(self) -> str:
        lines = [f"{self.JOB}: {self.subject()}: {self.total} scenes: {len(self.written)} written, "
                 f"{len(self.skipped)} skipped ({self.SKIPPED}), {len(self.failed)} failed "
                 f"in {self.seconds:.1f} s"]
        for sid, err in sorted(self.failed.items()):
            lines.append(f"  FAILED {sid}: {err}")
        if self.failed:
            lines.append(f"  re-run the same command to retry the failed scenes ({self.DONE} ones are skipped)")
        return "\n".join(lines)


def _error_text(exc: BaseException) -> str:
    # The message plus where it was raised: enough to find the cause without a full traceback.
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


def prepare_scene(task: SceneTask, root: str, expected_sha256: str | None,
                  num_classes: int) -> dict:
    """Ray task body: skip a complete shard, else build, validate and write the scene.

    Never raises: the outcome is returned so one bad scene cannot stop the others."""
    start = time.perf_counter()
    path = shards.scene_path(root, task.split, task.scene_id)
    result = {"scene_id": task.scene_id, "split": task.split, "status": "written", "error": ""}
    try:
        if path.is_file():
            # The manifest checksum is the fast proof; without it (a run killed before the
            # manifest was written) the shard must read back and validate in full.
            if expected_sha256 and shards.sha256_file(path) == expected_sha256:
                return {**result, "status": "skipped"}
            if not shards.verify_shard(path, num_classes):
                return {**result, "status": "skipped"}
        scene = task.make()
        if not isinstance(scene, dict):
            raise SceneError(f"scene {task.scene_id}: builder returned {type(scene).__name__}, not a dict")
        for key in ("scene_id", "split"):
            if scene.get(key) != getattr(task, key):
                raise SceneError(f"scene {task.scene_id}: {key}: builder returned "
                                 f"{scene.get(key)!r}, task says {getattr(task, key)!r}")
        validate_scene(scene, num_classes)
        shards.write_scene(root, scene)
    except Exception as exc:  # noqa: BLE001 - reported per scene in the summary
        result.update(status="failed", error=_error_text(exc))
    result["seconds"] = time.perf_counter() - start
    return result


def ensure_ray() -> None:
    """Join RAY_ADDRESS when set, else start a local Ray, unless Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        from rayseg.raylocal import init_local

        init_local()  # listening on 127.0.0.1 only


def _remove_stale_temps(root: Path, older_than: float) -> None:
    # Temp files of writers killed in an earlier run; ours are all renamed or removed by now.
    for tmp in shards._temp_files(root):
        try:
            if tmp.stat().st_mtime < older_than:
                tmp.unlink()
        except FileNotFoundError:
            pass


def run_prepare(out_root: str | Path, tasks: list[SceneTask], profile: str,
                metadata: dict | None = None, num_cpus_per_task: float = 1,
                progress_seconds: float = 5.0, settings: dict | None = None) -> PrepareSummary:
    """Prepare every task's scene as one Ray task and write the manifest; see the module doc.

    Scenes already complete in ``out_root`` are skipped; a failing scene is reported by id in
    the summary while the others complete. The manifest lists every shard in ``out_root``.
    ``settings`` (JSON-able) are what determine a shard's content (generator parameters, frame
    skip, image size...); they are stored in the manifest, and a folder whose manifest holds
    other settings is refused, since skipping its complete shards would silently mix scenes made
    two different ways."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    if not tasks:
        raise ValueError(f"nothing to prepare into {out_root}: the dataset reader found no scenes")
    seen: set[str] = set()
    for task in tasks:
        shards._check_scene_id(task.scene_id)
        if task.scene_id in seen:
            raise ValueError(f"duplicate scene id {task.scene_id!r} in the prepare tasks")
        seen.add(task.scene_id)
    if settings is not None:  # as the manifest will hold them (tuples become lists)
        settings = json.loads(json.dumps(settings))
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    num_classes = len(PROFILES[profile])
    expected: dict[str, str] = {}
    try:
        old = shards.load_manifest(root)
        if old.get("profile") != profile:
            raise ValueError(f"{root} holds a {old.get('profile')!r} dataset; refusing to add "
                             f"{profile!r} scenes (use another --out)")
        expected = {e["path"]: e["sha256"] for e in old["scenes"]}
        old_settings = (old.get("metadata") or {}).get("settings")
        if settings is not None and old_settings is not None and old_settings != settings:
            differ = sorted(k for k in set(settings) | set(old_settings) if settings.get(k) != old_settings.get(k))
            changes = ", ".join(f"{k}: {old_settings.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
            raise ValueError(f"{root} was prepared with other settings ({changes}); use another --out "
                             "or delete the folder")
    except (FileNotFoundError, shards.ShardError):
        pass  # no (usable) manifest yet: every existing shard is re-validated in full
    if settings is not None:
        metadata = {**(metadata or {}), "settings": settings}
    # Shards that no task will (re)write must belong to this dataset, else the manifest written at
    # the end would refuse them: say so now, before any work (task paths are re-validated anyway).
    foreign = shards.foreign_shards(root, profile, skip={shards.scene_path("", t.split, t.scene_id).as_posix()
                                                         for t in tasks})
    if foreign:
        raise ValueError(f"{root} holds {len(foreign)} file(s) that are not scenes of this {profile} dataset "
                         "(move them out, or prepare into another --out):\n  " + "\n  ".join(foreign))

    import ray

    ensure_ray()
    start = time.time()
    remote = ray.remote(prepare_scene).options(num_cpus=num_cpus_per_task, max_retries=1)
    pending = {}
    for task in tasks:
        rel = shards.scene_path("", task.split, task.scene_id).as_posix()
        pending[remote.remote(task, str(root), expected.get(rel), num_classes)] = task.scene_id
    summary = PrepareSummary(root=root, total=len(tasks))
    last_print = time.time()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=progress_seconds)
        for ref in ready:
            sid = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a crashed worker fails only its scene
                result = {"scene_id": sid, "status": "failed", "error": _error_text(exc)}
            if result["status"] == "failed":
                summary.failed[sid] = result["error"]
                print(f"prepare: scene {sid} FAILED: {result['error']}", file=sys.stderr, flush=True)
            else:
                getattr(summary, result["status"]).append(sid)
        done = summary.total - len(pending)
        if time.time() - last_print >= progress_seconds or not pending:
            elapsed = time.time() - start
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = f", ETA {len(pending) / rate:.0f} s" if rate > 0 and pending else ""
            print(f"prepare: {done}/{summary.total} scenes ({len(summary.written)} written, "
                  f"{len(summary.skipped)} skipped, {len(summary.failed)} failed), "
                  f"{rate:.2f} scenes/s{eta}", flush=True)
            last_print = time.time()
    _remove_stale_temps(root, older_than=start)
    shards.write_manifest(root, profile, metadata)
    summary.seconds = time.time() - start
    return summary


def synthetic_tasks(cfg) -> list[SceneTask]:
    """One SceneTask per synthetic scene of ``cfg`` (a SyntheticConfig)."""
    from rayseg.data import synthetic

    tasks = []
    for index, (scene_id, split) in enumerate(synthetic.scene_ids(cfg)):
        tasks.append(SceneTask(scene_id, split, functools.partial(synthetic.generate_scene, cfg, index)))
    return tasks


def prepare_synthetic(cfg, out_root: str | Path, num_cpus_per_task: float = 1) -> PrepareSummary:
    """Generate ``cfg.num_scenes`` synthetic scenes (rayseg.data.synthetic) into ``out_root``."""
    import dataclasses

    from rayseg.data.synthetic import GENERATOR_VERSION

    metadata = {"generator": "rayseg.data.synthetic", "coordinates": "axis_aligned"}
    settings = {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(cfg)}
    if not cfg.room_types:  # absent when unused, so folders prepared before the option still match
        del settings["room_types"]
    else:
        settings["room_types"] = list(cfg.room_types)
    if not cfg.mix_p:  # the same: absent when 0
        del settings["mix_p"]
    return run_prepare(out_root, synthetic_tasks(cfg), cfg.profile, metadata, num_cpus_per_task, settings=settings)
