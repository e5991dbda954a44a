"""The pure-PyTorch sparse backend: runs anywhere torch runs (CPU, CUDA), nothing to compile.

A convolution is, per kernel offset, gather input rows -> matmul with that offset's weight ->
accumulate into the output rows, over the pairs of a cached KernelMap. On CPU the pairs are
visited one block of output rows at a time (all offsets of a block before the next block), so
the rows being accumulated stay in cache. The backward pass is written by hand so that nothing
per-offset is kept alive between forward and backward: it saves only the layer input and the
weights, and re-gathers rows block by block (autograd would keep every gathered copy, ~K times
the input, for the whole forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from rayseg.sparse.common import check_input
from rayseg.sparse.coords import ChunkPlan, CoordinateManager, KernelMap

__all__ = ["SparseTensor", "Conv", "ConvTranspose", "BatchNorm", "ReLU", "cat", "make_input",
           "features", "sparse_conv", "CoordinateManager", "KernelMap"]


@dataclass
class SparseTensor:
    """Features of the voxels of one tensor stride; coordinates live in the manager."""

    feats: torch.Tensor  # (M, C), rows in the manager's order for `stride`
    stride: int
    manager: CoordinateManager

    @property
    def coordinates(self) -> torch.Tensor:
        """(M, 4) int64 [batch, x, y, z], rows matching `feats`."""
        return self.manager.coordinates(self.stride)

    def replace(self, feats: torch.Tensor) -> "SparseTensor":
        return SparseTensor(feats, self.stride, self.manager)

    def __add__(self, other: "SparseTensor") -> "SparseTensor":
        _check_same_voxels(self, other)
        return self.replace(self.feats + other.feats)

    def __iadd__(self, other: "SparseTensor") -> "SparseTensor":
        _check_same_voxels(self, other)
        self.feats.add_(other.feats)
        return self


def _check_same_voxels(a: SparseTensor, b: SparseTensor) -> None:
    if a.manager is not b.manager or a.stride != b.stride:
        raise ValueError(f"sparse tensors are on different voxel sets (strides {a.stride} and "
                         f"{b.stride}, {'same' if a.manager is b.manager else 'different'} coordinate managers)")


def make_input(coord, feat, in_channels: int | None = None) -> SparseTensor:
    """The stride-1 sparse tensor of validated (M, 4) coordinates and (M, C) features."""
    coord, feat = check_input(coord, feat, in_channels)
    manager = CoordinateManager(coord)
    return SparseTensor(manager.from_input_order(feat), 1, manager)


def features(x: SparseTensor) -> torch.Tensor:
    """(M, C) features of a stride-1 tensor, rows in the order of the input coordinates."""
    if x.stride != 1:
        raise ValueError(f"features() maps stride-1 tensors back to input rows, got stride {x.stride}")
    return x.manager.to_input_order(x.feats)


class _PerOffsetConv(torch.autograd.Function):
    # The reference algorithm (kept for tests and comparison): each offset's pairs over the
    # whole tensor at once.
    # Within one weight index every output row (and every input row) occurs at most once, so
    # accumulation needs no atomic scatter: gather the rows' running sums, add the product in
    # the GEMM itself (addmm_, beta = 1) and copy them back. index_add_ would do the same with
    # a sort-based parallel scatter that costs 10-20x more with two threads on a busy machine.
    # Gathers and products go to workspaces reused across offsets (sized for the largest),
    # not fresh allocations that are page-faulted in on every offset.

    @staticmethod
    def forward(ctx, feats: torch.Tensor, kernel: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
        feats = feats.contiguous()
        if kmap.identity is not None:
            out = feats @ kernel[kmap.identity]
        else:
            out = feats.new_zeros(kmap.num_out, kernel.shape[-1])
        gathered = feats.new_empty(kmap.max_pairs, feats.shape[1])
        partial = feats.new_empty(kmap.max_pairs, kernel.shape[-1])
        for w, rows_in, rows_out in kmap.pairs:
            n = len(rows_in)
            x = torch.index_select(feats, 0, rows_in, out=gathered[:n])
            acc = torch.index_select(out, 0, rows_out, out=partial[:n])
            acc.addmm_(x, kernel[w])
            out.index_copy_(0, rows_out, acc)
        ctx.kmap = kmap
        ctx.save_for_backward(feats, kernel)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        feats, kernel = ctx.saved_tensors
        kmap: KernelMap = ctx.kmap
        grad_out = grad_out.contiguous()
        need_feats, need_kernel = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_feats = grad_kernel = None
        if need_feats:
            if kmap.identity is not None:
                grad_feats = grad_out @ kernel[kmap.identity].T
            else:
                grad_feats = torch.zeros_like(feats)
        if need_kernel:
            grad_kernel = _weight_grad_with_centre(feats, grad_out, kernel, kmap)
        grad_rows = grad_out.new_empty(kmap.max_pairs, grad_out.shape[1])
        in_rows = feats.new_empty(kmap.max_pairs, feats.shape[1])  # input rows, then their grads
        for w, rows_in, rows_out in kmap.pairs:
            n = len(rows_in)
            g = torch.index_select(grad_out, 0, rows_out, out=grad_rows[:n])
            if need_kernel:
                x = torch.index_select(feats, 0, rows_in, out=in_rows[:n])
                torch.mm(x.T, g, out=grad_kernel[w])
            if need_feats:
                acc = torch.index_select(grad_feats, 0, rows_in, out=in_rows[:n])
                acc.addmm_(g, kernel[w].T)
                grad_feats.index_copy_(0, rows_in, acc)
        return grad_feats, grad_kernel, None


# Rows per block of the blocked algorithm: the block of accumulated rows (rows x channels x 4
# bytes) should stay in the per-core L2 cache (2 MiB here) while all offsets add into it.
CHUNK_BYTES = 2 << 20  # measured: 2 MiB beat 0.25, 0.5 and 1 MiB on MinkUNet18A
MIN_CHUNK_ROWS = 512


def chunk_rows_for(channels: int) -> int:
    """Block rows for accumulating `channels`-wide rows: a power of two near CHUNK_BYTES."""
    rows = CHUNK_BYTES // (4 * max(channels, 1))
    return max(MIN_CHUNK_ROWS, 1 << (rows.bit_length() - 1))


def _weight_grad_with_centre(feats: torch.Tensor, grad_out: torch.Tensor, kernel: torch.Tensor,
                             kmap: KernelMap) -> torch.Tensor:
    """A zero weight gradient with the identity offset's term (every row paired with itself)
    already in; the other offsets are added pair by pair."""
    grad_kernel = torch.zeros_like(kernel)
    if kmap.identity is not None:
        torch.mm(feats.T, grad_out, out=grad_kernel[kmap.identity])
    return grad_kernel


def _accumulate_blocks(dest: torch.Tensor | None, src: torch.Tensor, weights: torch.Tensor, plan: ChunkPlan,
                       centre: torch.Tensor | None, src_rows: torch.Tensor | None = None,
                       grad_kernel: torch.Tensor | None = None) -> None:
    """dest[r] = src[r] @ centre + sum over plan pairs (w, far, r) of src[far] @ weights[w], one
    block of dest rows at a time (dest's block stays in cache across the offsets).

    With `grad_kernel`, also grad_kernel[w] += src_rows[r]^T @ src[far] over the same pairs
    (the weight gradient, from the rows the block already has at hand). dest None: only that.
    """
    gathered = src.new_empty(plan.max_pairs, src.shape[1])
    partial = src.new_empty(plan.max_pairs, dest.shape[1]) if dest is not None else None
    own = src_rows.new_empty(plan.max_pairs, src_rows.shape[1]) if grad_kernel is not None else None
    for c, block in enumerate(plan.blocks):
        a, b = plan.bounds(c)
        dest_block = dest[a:b] if dest is not None else None
        if dest_block is not None:
            if centre is not None:
                torch.mm(src[a:b], centre, out=dest_block)
            else:
                dest_block.zero_()
        for w, far, local in block:
            n = len(far)
            x = torch.index_select(src, 0, far, out=gathered[:n])
            if dest_block is not None:
                acc = torch.index_select(dest_block, 0, local, out=partial[:n])
                acc.addmm_(x, weights[w])
                dest_block.index_copy_(0, local, acc)
            if grad_kernel is not None:
                y = torch.index_select(src_rows[a:b], 0, local, out=own[:n])
                grad_kernel[w].addmm_(y.T, x)


class _BlockedConv(torch.autograd.Function):
    # The same sums as _PerOffsetConv, reordered: blocks of output rows (forward) or input rows
    # (backward) in the outer loop, offsets inside. All three products stay per-offset GEMMs:
    # a dense neighbour table (implicit GEMM) runs its GEMM faster, but surfaces fill only ~half
    # of the 27 neighbours, so it does ~2x the FLOPs, and measured slower on CPU.

    @staticmethod
    def forward(ctx, feats: torch.Tensor, kernel: torch.Tensor, kmap: KernelMap, chunk_rows: int | None):
        feats = feats.contiguous()
        rows = chunk_rows or chunk_rows_for(kernel.shape[-1])
        out = feats.new_empty(kmap.num_out, kernel.shape[-1])
        centre = kernel[kmap.identity] if kmap.identity is not None else None
        _accumulate_blocks(out, feats, kernel, kmap.chunked("out", rows), centre)
        ctx.kmap, ctx.chunk_rows = kmap, chunk_rows
        ctx.save_for_backward(feats, kernel)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        feats, kernel = ctx.saved_tensors
        kmap: KernelMap = ctx.kmap
        grad_out = grad_out.contiguous()
        need_feats, need_kernel = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_feats = grad_kernel = None
        if not (need_feats or need_kernel):
            return None, None, None, None
        # grad_feats[i] = sum over pairs (w, i, o) of grad_out[o] @ kernel[w]^T: the forward
        # over the map read from the input side, with each offset's weight transposed.
        rows = ctx.chunk_rows or chunk_rows_for(kernel.shape[1])
        plan = kmap.chunked("in", rows)
        kernel_t = kernel.transpose(1, 2).contiguous()
        if need_kernel:
            grad_kernel = _weight_grad_with_centre(feats, grad_out, kernel, kmap)
        if need_feats:
            grad_feats = torch.empty_like(feats)
        centre = kernel_t[kmap.identity] if kmap.identity is not None else None
        # Without need_feats (a layer on the network input) only the weight gradient is summed.
        _accumulate_blocks(grad_feats, grad_out, kernel_t, plan, centre,
                           src_rows=feats if need_kernel else None, grad_kernel=grad_kernel)
        return grad_feats, grad_kernel, None, None


def sparse_conv(feats: torch.Tensor, kernel: torch.Tensor, kmap: KernelMap, *, chunk_rows: int | None = None,
                method: str | None = None) -> torch.Tensor:
    """out[o] = sum over (w, i, o) in kmap of feats[i] @ kernel[w]; kernel is (K, Cin, Cout).

    `method`: 'blocked' (the default on CPU) or 'per_offset' (the default elsewhere: on a GPU,
    cache blocking buys nothing and its many small launches cost). `chunk_rows` overrides the
    block size of 'blocked' (by default sized from the channels to stay in cache).
    """
    if method is None:
        method = "blocked" if feats.device.type == "cpu" else "per_offset"
    if method == "blocked":
        return _BlockedConv.apply(feats, kernel, kmap, chunk_rows)
    if method == "per_offset":
        return _PerOffsetConv.apply(feats, kernel, kmap)
    raise ValueError(f"unknown sparse_conv method {method!r}; use 'blocked' or 'per_offset'")


def _kernel_parameter(volume: int, in_channels: int, out_channels: int, fan: int) -> nn.Parameter:
    # MinkowskiEngine's layout: (volume, in, out), or (in, out) for a 1x1x1 kernel ...
    shape = (in_channels, out_channels) if volume == 1 else (volume, in_channels, out_channels)
    # ... and its default init, uniform in +-1/sqrt(volume * fan channels)
    bound = 1.0 / (volume * fan) ** 0.5
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


def _bias_parameter(volume: int, out_channels: int, fan: int) -> nn.Parameter:
    bound = 1.0 / (volume * fan) ** 0.5  # shape (1, out) as MinkowskiEngine's
    return nn.Parameter(torch.empty(1, out_channels).uniform_(-bound, bound))


class Conv(nn.Module):
    """Odd kernel at stride 1 (output voxels = input voxels), or kernel 2 stride 2 (down-sampling)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 bias: bool = False):
        super().__init__()
        if not ((stride == 1 and kernel_size % 2 == 1) or (stride == 2 and kernel_size == 2)):
            raise NotImplementedError(f"Conv supports odd kernels at stride 1 and kernel 2 at stride 2, "
                                      f"got kernel {kernel_size} stride {stride}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.kernel = _kernel_parameter(kernel_size**3, in_channels, out_channels, fan=in_channels)
        self.bias = _bias_parameter(kernel_size**3, out_channels, fan=in_channels) if bias else None

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.kernel_size == 1:
            out = x.feats @ self.kernel
            stride = x.stride
        elif self.stride == 1:
            out = sparse_conv(x.feats, self.kernel, x.manager.conv_map(x.stride, self.kernel_size))
            stride = x.stride
        else:
            out = sparse_conv(x.feats, self.kernel, x.manager.down_map(x.stride))
            stride = 2 * x.stride
        if self.bias is not None:
            out = out + self.bias
        return SparseTensor(out, stride, x.manager)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


class ConvTranspose(nn.Module):
    """Kernel 2 stride 2 up-sampling onto the existing voxels of the finer stride."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2,
                 bias: bool = False):
        super().__init__()
        if kernel_size != 2 or stride != 2:
            raise NotImplementedError(f"ConvTranspose supports kernel 2 stride 2, got {kernel_size}, {stride}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel = _kernel_parameter(8, in_channels, out_channels, fan=out_channels)
        self.bias = _bias_parameter(8, out_channels, fan=out_channels) if bias else None

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = sparse_conv(x.feats, self.kernel, x.manager.up_map(x.stride))
        if self.bias is not None:
            out = out + self.bias
        return SparseTensor(out, x.stride // 2, x.manager)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=2, stride=2"


class BatchNorm(nn.Module):
    """nn.BatchNorm1d over voxels (held as `.bn`, the same parameter names as MinkowskiEngine)."""

    def __init__(self, channels: int, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels, momentum=momentum)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.training and x.feats.shape[0] < 2:
            raise ValueError(f"batch norm in training mode needs at least 2 voxels, got "
                             f"{x.feats.shape[0]} at tensor stride {x.stride}: use a larger scene "
                             "or batch, or eval mode")
        return x.replace(self.bn(x.feats))


class ReLU(nn.Module):
    """In place, as MinkowskiEngine's (and torchvision's): apply it to fresh outputs only
    (after a BN or an addition), never to a tensor that is also used elsewhere."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(torch.relu_(x.feats))


def cat(*tensors: SparseTensor) -> SparseTensor:
    """Channel concatenation of sparse tensors on the same voxels (skip connections)."""
    for t in tensors[1:]:
        _check_same_voxels(tensors[0], t)
    return tensors[0].replace(torch.cat([t.feats for t in tensors], dim=1))
