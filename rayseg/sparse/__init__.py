"""Sparse 3D convolution: one small interface, two implementations.

A sparse tensor is integer voxel coordinates with a batch index, per-voxel features and a tensor
stride; a coordinate manager travelling with it caches the voxel sets of every stride and the
neighbour (kernel) maps between them, so each map is built once per forward pass and reused.

A backend is a module that provides:

``Conv(in_channels, out_channels, kernel_size, stride=1, bias=False)``
    odd kernel at stride 1 (output voxels = input voxels), or kernel 2 stride 2 (down-sampling:
    output voxel = floor(coordinate / 2s) * 2s). Parameter ``kernel``: (K^3, in, out), or
    (in, out) for kernel 1; optional ``bias``.
``ConvTranspose(in_channels, out_channels, kernel_size=2, stride=2)``
    up-sampling onto the finer stride's existing voxels (MinkowskiEngine's generative=False).
``BatchNorm(channels)`` (an ``nn.BatchNorm1d`` as ``.bn``), ``ReLU()``, ``cat(a, b)`` (channel
concatenation of two tensors on the same voxels), ``a + b`` on sparse tensors,
``make_input(coord, feat)`` and ``features(x)`` (the (M, C) features in input row order).

Both backends enumerate kernel offsets in the same order, MinkowskiEngine's: x fastest, then y,
then z, each from -r to r (kernel 2: 0, 1); so their parameters are interchangeable as they are.

Inputs are checked once at the edge (``check_input``): (M, 4) integer coordinates
[batch, x, y, z], (M, C) finite float features, M >= 1 and no duplicate coordinates. Duplicates
are an error rather than silently merged: voxelisation (unique voxels + the ``inverse`` index
that maps voxel outputs back to points) is the pipeline's job, and merging here would break the
row correspondence between ``feat`` and the outputs.
"""

from __future__ import annotations

import importlib
import types

from rayseg.sparse.common import (BackendUnavailable, SparseInputError, check_input,
                                  duplicate_error, import_minkowski, to_points)

__all__ = ["BACKENDS", "get_backend", "minkowski_status", "check_input", "duplicate_error",
           "import_minkowski", "to_points", "SparseInputError", "BackendUnavailable"]

# backend name -> implementation module, imported on first use ('minkowski' is a compiled extra
# that may be missing, and slow to import).
BACKENDS: dict[str, str] = {
    "torch": "rayseg.sparse.torch_backend",
    "minkowski": "rayseg.sparse.minkowski_backend",
}


def get_backend(name: str) -> types.ModuleType:
    """The implementation module of backend `name`.

    Unknown names raise ValueError listing the available backends (and whether 'minkowski'
    can be used here); 'minkowski' raises BackendUnavailable with the import error when
    MinkowskiEngine is missing or broken.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown sparse backend {name!r}; available: {', '.join(BACKENDS)} "
                         f"({minkowski_status()})")
    return importlib.import_module(BACKENDS[name])


def minkowski_status() -> str:
    """'minkowski is available' or why it is not (the import error text)."""
    try:
        import_minkowski()
    except BackendUnavailable as exc:
        return f"minkowski is unavailable here: {exc}"
    return "minkowski is available"
