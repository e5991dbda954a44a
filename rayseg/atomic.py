"""Atomic file writes, the one implementation every writer uses: a hidden temp file in the
target's folder, fsync'd and renamed onto the target, so a reader (or a resumed job) sees either
the old file or the whole new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a hidden temp path next to ``final``; on success fsync and rename it onto ``final``.

    On any exception the temp file is removed and ``final`` is left untouched. The file gets
    the usual permissions (0666 minus the umask), not mkstemp's 0600, so it is readable on
    shared storage."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TEMP_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
