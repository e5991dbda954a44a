"""Finding a run's checkpoints, loading them (``state.pt``) without running code from them, and
handing Ray Train's checkpoint to a restarted worker without a shared temporary copy.

A checkpoint holds tensors and plain Python values only (model / optimizer / generator states,
the flat config, progress, class names). ``torch.load(weights_only=True)`` unpickles exactly that
and refuses any other object, so a planted ``state.pt`` whose pickle would import and call
something (``os.system``, ``eval``...) is refused before anything runs. Every site that loads a
checkpoint (resume, evaluation, pseudo-labels, Tune trials) goes through :func:`load_state`.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

CHECKPOINT_FILE = "state.pt"


class UnsafeCheckpointError(ValueError):
    """The file holds objects a rayseg checkpoint never holds (it would run code to load)."""


def checkpoint_dir_name(step: int, stage: str, epoch: int) -> str:
    """The folder of one checkpoint in <run>/checkpoints/: <step>-<stage>-e<epoch>, zero-padded so
    that names sort by step."""
    return f"{step:09d}-{stage}-e{epoch:04d}"


def parse_checkpoint_name(name: str) -> tuple[int, str, int] | None:
    """(step, stage, epoch) of a checkpoint_dir_name, or None for any other name."""
    match = re.fullmatch(r"(\d+)-([a-z_]+)-e(\d+)", name)
    return (int(match[1]), match[2], int(match[3])) if match else None


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint files, oldest first. Skips ".tmp-*" directories: a
    checkpoint being written (or killed mid-write) is not one."""
    return sorted(p for p in (run_dir / "checkpoints").glob("*/" + CHECKPOINT_FILE)
                  if not p.parent.name.startswith("."))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_file(checkpoint: str | Path) -> Path:
    """The state.pt that `checkpoint` names: the file itself, or the folder
    <run>/checkpoints/<step>-<stage>-e<epoch> holding it. FileNotFoundError naming it when there
    is none."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint file (give a {CHECKPOINT_FILE} or the "
                                "folder holding it, <run>/checkpoints/<step>-<stage>-e<epoch>)")
    return path


def names_checkpoint(path: str | Path) -> bool:
    """Whether `path` is meant as one checkpoint rather than a run directory: a state.pt (present
    or not: checkpoint_file names it when it is missing) or a folder holding one."""
    path = Path(path)
    return path.name == CHECKPOINT_FILE or (path / CHECKPOINT_FILE).is_file()


def run_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The checkpoint a reader of a run uses: `checkpoint` when given (checkpoint_file), else the
    run's latest. FileNotFoundError naming the run or file when there is none."""
    if checkpoint is not None:
        return checkpoint_file(checkpoint)
    path = latest_checkpoint(Path(run_dir))
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint found under checkpoints/")
    return path


def load_state(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint dict at ``path``, loaded with ``weights_only=True``.

    Raises UnsafeCheckpointError naming the file when its pickle asks for anything beyond
    tensors and plain containers (never the case for a checkpoint rayseg wrote), ValueError when
    it loads but is not a dict, and torch's own errors for a missing or truncated file (callers
    that can fall back to an older checkpoint catch those)."""
    import torch

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names a forbidden import as "Unsupported GLOBAL module.name"; a file that is not
        # a pickle at all (garbage, another format) fails on an opcode instead and stays a plain
        # load error, like a truncated one.
        refused = _forbidden_global(exc)
        if refused:
            raise UnsafeCheckpointError(
                f"{path}: refused to load: its pickle imports {refused}, which a rayseg checkpoint "
                "never holds (loading it could run code). Only tensors and plain Python values "
                "are accepted; delete the file or replace it with one rayseg wrote.") from None
        raise
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a rayseg checkpoint (holds a {type(state).__name__}, expected a dict)")
    return state


def _forbidden_global(exc: Exception) -> str:
    """The global torch's safe unpickler refused, e.g. 'posix.system' ('' when none is named)."""
    for line in str(exc).splitlines():
        if "unsupported global" in line.lower():
            words = line.split()
            i = [w.lower() for w in words].index("global")
            return words[i + 1] if i + 1 < len(words) else line.strip()
    return ""


@contextlib.contextmanager
def ray_checkpoint_file(ckpt) -> Iterator[Path | None]:
    """The ``state.pt`` of a Ray Train checkpoint (or None without one), for this process only.

    Ray's ``Checkpoint.to_directory()`` without a path copies into one temporary folder per
    checkpoint, shared by every process on the node and never removed: two restarted ranks then
    copy into the same folder while the other reads it ("does not load"), and every restart leaves
    a full copy in the system temp dir. Here a checkpoint on a local filesystem is read where it
    is (no copy); one elsewhere (S3...) is copied into a private temporary folder that is removed
    when the block ends."""
    if ckpt is None:
        yield None
        return
    import pyarrow.fs

    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(ckpt.path) / CHECKPOINT_FILE
        return
    tmp = Path(tempfile.mkdtemp(prefix="rayseg-resume-"))
    try:
        ckpt.to_directory(str(tmp))
        yield tmp / CHECKPOINT_FILE
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_partial_ray_copies(run_dir: str | Path) -> list[Path]:
    """Delete Ray Train's copies of the run directory's checkpoints that a kill cut short.

    Rank 0 hands every checkpoint it writes (``checkpoints/<name>/state.pt``) to Ray Train, which
    keeps it in its storage under the same name (``ray/<trainer run>/<name>/``; hard links on local
    storage, link_into_ray_storage, a copy elsewhere) and registers it only once that is complete.
    A kill during a copy leaves a truncated file there that nothing restores or removes (266 MB on
    a real run). A copy whose ``state.pt`` is missing or differs in size from the original's is
    such a remnant, and so is a link_tree temp folder (``.tmp-<name>-*``); a copy whose original
    was pruned is left to Ray, which prunes its own. Returns the removed folders."""
    run_dir = Path(run_dir)
    removed = []
    for copy in sorted((run_dir / "ray").glob("*/?????????-*-e????")):
        original = run_dir / "checkpoints" / copy.name / CHECKPOINT_FILE
        if not copy.is_dir() or not original.is_file():
            continue
        mine = copy / CHECKPOINT_FILE
        if mine.is_file() and mine.stat().st_size == original.stat().st_size:
            continue
        shutil.rmtree(copy, ignore_errors=True)
        removed.append(copy)
    for tmp in sorted((run_dir / "ray").glob("*/.tmp-?????????-*-e????-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def link_into_ray_storage(checkpoint, name: str):
    """Ray Train's upload of a checkpoint rank 0 wrote into the run directory (the
    ``checkpoint_upload_fn`` of ``ray.train.report``): on local storage (the run directory's
    ``ray/`` folder, where rayseg puts it) the files are hard-linked under Ray's name for them,
    so Ray's copy, which it restores into restarted workers and prunes by its own
    ``num_to_keep``, costs no disk; its default copies every checkpoint, doubling a run's
    checkpoint disk (Tune trials always run a Ray Train worker). Other storage: Ray's copy."""
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()  # a Ray DeveloperAPI (Ray 2.60)
    if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return storage.persist_current_checkpoint(checkpoint, name)
    dest = Path(storage.build_checkpoint_path_from_name(name))
    if dest.exists():  # a remnant of a kill (a worker restart reports the same name again)
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    link_tree(Path(checkpoint.path), dest)
    return ray.train.Checkpoint.from_directory(str(dest))


def link_tree(src: Path, dst: Path) -> None:
    """dst = src with hard links (a copy where links are impossible), via a temp dir + rename: a
    run branched from another's checkpoint shares its files instead of copying them."""
    import os
    import uuid

    tmp = dst.parent / f".tmp-{dst.name}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    os.replace(tmp, dst)


def _link_or_copy(src: str, dst: str) -> None:
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
