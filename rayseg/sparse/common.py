"""Input checks and errors shared by the sparse backends."""

from __future__ import annotations

import collections
import collections.abc
import warnings

import numpy as np
import torch


class SparseInputError(ValueError):
    """Coordinates or features handed to a sparse network break the input contract."""


class BackendUnavailable(ImportError):
    """A known sparse backend cannot be used here (e.g. MinkowskiEngine is not installed)."""


def check_input(coord, feat, in_channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert network inputs; returns (coord int64 (M, 4), feat float (M, C)).

    Raises SparseInputError naming the argument and what is wrong. Duplicate coordinates are
    checked by the backends (they sort the voxel keys anyway), see ``duplicate_error``.
    """
    if isinstance(coord, np.ndarray):
        coord = torch.from_numpy(coord)
    if isinstance(feat, np.ndarray):
        feat = torch.from_numpy(feat)
    if not isinstance(coord, torch.Tensor) or not isinstance(feat, torch.Tensor):
        raise SparseInputError(f"coord and feat must be tensors or numpy arrays, got "
                               f"{type(coord).__name__} and {type(feat).__name__}")
    if coord.ndim != 2 or coord.shape[1] != 4 or coord.dtype.is_floating_point or coord.dtype == torch.bool:
        raise SparseInputError(f"coord: expected integer voxel coordinates of shape (M, 4) "
                               f"[batch, x, y, z], got dtype {coord.dtype} shape {tuple(coord.shape)}")
    if coord.shape[0] == 0:
        raise SparseInputError("coord: empty input (0 voxels); a scene needs at least one voxel")
    if feat.ndim != 2 or feat.shape[0] != coord.shape[0] or not feat.dtype.is_floating_point:
        raise SparseInputError(f"feat: expected float features of shape ({coord.shape[0]}, C) matching "
                               f"coord, got dtype {feat.dtype} shape {tuple(feat.shape)}")
    if in_channels is not None and feat.shape[1] != in_channels:
        raise SparseInputError(f"feat: the network takes {in_channels} input channels, got {feat.shape[1]}")
    bad = ~torch.isfinite(feat).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        raise SparseInputError(f"feat: {len(rows)} voxel(s) with NaN/Inf features, first at row "
                               f"{int(rows[0])}: {feat[rows[0]].tolist()}")
    coord = coord.long()
    if bool((coord[:, 0] < 0).any()):
        raise SparseInputError("coord: batch index (column 0) must be >= 0")
    if feat.device != coord.device:
        coord = coord.to(feat.device)
    return coord, feat


def duplicate_error(coord: torch.Tensor, rows: torch.Tensor) -> SparseInputError:
    """The error for duplicate voxel coordinates; `rows` are the rows repeating an earlier one."""
    first = coord[rows[0]].tolist()
    return SparseInputError(
        f"coord: {len(rows)} duplicate voxel coordinate(s), first [batch, x, y, z] = {first} at row "
        f"{int(rows[0])}; voxelise first (unique voxels, and the inverse index to map back to points)")


def to_points(voxel_values: torch.Tensor, inverse) -> torch.Tensor:
    """Per-point values from per-voxel values: plain indexing by the voxelisation's inverse."""
    if isinstance(inverse, np.ndarray):
        inverse = torch.from_numpy(inverse)
    return voxel_values[inverse.to(voxel_values.device).long()]


def import_minkowski():
    """Import MinkowskiEngine, the one place that does; BackendUnavailable says why it failed."""
    # ME 0.5.4 imports `collections.Sequence`, an alias Python 3.10 removed.
    if not hasattr(collections, "Sequence"):
        collections.Sequence = collections.abc.Sequence
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*CPU_ONLY.*")  # expected on CPU builds
            import MinkowskiEngine as ME
    except Exception as exc:  # ImportError, or a broken build's OSError / RuntimeError
        raise BackendUnavailable(
            f"MinkowskiEngine cannot be imported ({type(exc).__name__}: {exc}); install the "
            f"'rayseg[minkowski]' extra (CPU recipe: `make minkowski`)") from exc
    return ME
