"""The MinkowskiEngine 0.5.4 backend: the reference implementation users know.

The same interface as the torch backend, made of MinkowskiEngine modules, so a network built on
it has MinkowskiEngine's own parameter names and layouts (checkpoints of the reference code load
as they are). Importing this module fails with BackendUnavailable when MinkowskiEngine is absent.
"""

from __future__ import annotations

import torch

from rayseg.sparse.common import check_input, duplicate_error, import_minkowski
from rayseg.sparse.coords import _encode, _key_box

ME = import_minkowski()

__all__ = ["Conv", "ConvTranspose", "BatchNorm", "ReLU", "cat", "make_input", "features"]


class Conv(ME.MinkowskiConvolution):
    """Odd kernel at stride 1, or kernel 2 stride 2 (MinkowskiConvolution in 3D)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                         bias=bias, dimension=3)


class ConvTranspose(ME.MinkowskiConvolutionTranspose):
    """Kernel 2 stride 2 up-sampling onto the finer stride's existing voxels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2,
                 bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                         bias=bias, dimension=3)


class BatchNorm(ME.MinkowskiBatchNorm):
    def __init__(self, channels: int, momentum: float = 0.1):
        super().__init__(channels, momentum=momentum)


class ReLU(ME.MinkowskiReLU):
    def __init__(self):
        super().__init__(inplace=True)


def cat(*tensors):
    return ME.cat(*tensors)


def make_input(coord, feat, in_channels: int | None = None):
    """A MinkowskiEngine SparseTensor of validated coordinates and features (rows kept in order)."""
    coord, feat = check_input(coord, feat, in_channels)
    lo, size = _key_box(coord)
    keys, order = torch.sort(_encode(coord, lo, size), stable=True)
    dup = keys[1:] == keys[:-1]
    if bool(dup.any()):
        raise duplicate_error(coord, order[1:][dup])
    return ME.SparseTensor(features=feat, coordinates=coord.int(), device=str(feat.device))


def features(x) -> torch.Tensor:
    """(M, C) features of a stride-1 tensor, rows in the order of the input coordinates."""
    return x.F
