"""Voxel sets per tensor stride and the kernel maps between them (the torch backend's core).

Every voxel [b, x, y, z] at stride s is stored in compact units q = [b, x//s, y//s, z//s] and
encoded as one int64 key, linear in q with z fastest:

    key = ((b * SX + qx - lox) * SY + qy - loy) * SZ + qz - loz

The box (lo, S) leaves a margin of MARGIN voxels on every side, so a neighbour at offset d
(|d| <= MARGIN) has key `key + d . (SY*SZ, SZ, 1)` and can never alias a voxel of another
row, column or scene. Each stride's rows are kept in ascending key order: neighbour search is a
binary search (`searchsorted`) in one sorted array, and gathers walk memory mostly forwards.

Kernel maps list, per kernel offset, the (input row, output row) pairs the convolution connects.
They are built once per stride and cached in the manager; the network's convolutions at the same
stride share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rayseg.sparse.common import SparseInputError, duplicate_error

MARGIN = 2  # the largest kernel radius used (stem kernel 5)


@dataclass
class KernelMap:
    """Which input rows feed which output rows, per kernel weight index.

    `pairs` holds (weight index, input rows, output rows); within one weight index an output row
    appears at most once. `identity`, when set, is a weight index that maps every row to itself
    (the centre of a stride-preserving convolution): a plain matmul, no gather or scatter.
    """

    num_in: int
    num_out: int
    pairs: list[tuple[int, torch.Tensor, torch.Tensor]]
    identity: int | None = None
    _plans: dict = field(default_factory=dict, repr=False, compare=False)  # (side, rows) -> ChunkPlan

    @property
    def max_pairs(self) -> int:
        """The largest number of pairs of one weight index (workspace size of a convolution)."""
        return max((len(i) for _, i, _ in self.pairs), default=0)

    def transposed(self) -> "KernelMap":
        """The same connections read backwards (a transposed convolution)."""
        return KernelMap(self.num_out, self.num_in, [(w, o, i) for w, i, o in self.pairs], self.identity)

    def num_pairs(self) -> int:
        return sum(len(i) for _, i, _ in self.pairs) + (self.num_in if self.identity is not None else 0)

    def chunked(self, side: str, rows: int) -> "ChunkPlan":
        """The pairs grouped by blocks of `rows` consecutive rows of one side ('out' or 'in'),
        cached. A convolution then accumulates one block at a time, so the rows it gathers and
        writes back stay in cache instead of streaming the whole output once per offset.

        Needs, per weight index, the rows of that side in ascending order (true of every map
        the manager builds: neighbour search walks keys in order, and down-sampling is monotone
        within one child offset); then a block's pairs are one contiguous slice of each offset.
        """
        key = (side, rows)
        if key not in self._plans:
            self._plans[key] = ChunkPlan.build(self, side, rows)
        return self._plans[key]


@dataclass
class ChunkPlan:
    """A kernel map's pairs by blocks of rows of one side ("this" side; the other is "far").

    `blocks[c]` lists (weight index, far rows, this side's rows minus the block start) for the
    rows [c * rows, min((c + 1) * rows, num_this)). Far rows are views of the map's tensors; only
    the block-local indices are new memory.
    """

    rows: int
    num_rows: int  # rows on this side
    blocks: list[list[tuple[int, torch.Tensor, torch.Tensor]]]
    max_pairs: int  # the most pairs of one weight index within one block (workspace size)

    def bounds(self, c: int) -> tuple[int, int]:
        return c * self.rows, min((c + 1) * self.rows, self.num_rows)

    @staticmethod
    def build(kmap: KernelMap, side: str, rows: int) -> "ChunkPlan":
        if side not in ("out", "in"):
            raise ValueError(f"side must be 'out' or 'in', got {side!r}")
        if rows < 1:
            raise ValueError(f"chunk rows must be >= 1, got {rows}")
        num_rows = kmap.num_out if side == "out" else kmap.num_in
        num_blocks = max(-(-num_rows // rows), 1)
        blocks: list[list] = [[] for _ in range(num_blocks)]
        max_pairs = 0
        for w, rows_in, rows_out in kmap.pairs:
            this, far = (rows_out, rows_in) if side == "out" else (rows_in, rows_out)
            if len(this) == 0:
                continue
            if bool((this[1:] < this[:-1]).any()):
                raise ValueError(f"kernel map rows of weight {w} are not ascending on side {side!r}")
            block = torch.div(this, rows, rounding_mode="floor")
            local = this - block * rows
            counts = torch.bincount(block, minlength=num_blocks).tolist()
            start = 0
            for c, n in enumerate(counts):
                if n:
                    blocks[c].append((w, far[start:start + n], local[start:start + n]))
                    max_pairs = max(max_pairs, n)
                start += n
        return ChunkPlan(rows, num_rows, blocks, max_pairs)


@dataclass
class _Level:
    """The voxels of one tensor stride, in ascending key order."""

    stride: int
    q: torch.Tensor  # (M, 4) int64 compact coordinates [b, x//s, y//s, z//s]
    keys: torch.Tensor  # (M,) int64, ascending
    lo: torch.Tensor  # (3,) int64, box origin (with margin)
    size: tuple[int, int, int]  # box extent (SX, SY, SZ)


def _key_box(q: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    lo = q[:, 1:].amin(dim=0) - MARGIN
    hi = q[:, 1:].amax(dim=0) + MARGIN
    size = tuple(int(v) for v in (hi - lo + 1).tolist())
    num_batches = int(q[:, 0].max()) + 1
    if num_batches * size[0] * size[1] * size[2] >= 2**62:
        raise SparseInputError(f"coord: voxel extent {size} x {num_batches} scenes does not fit int64 "
                               "keys; check the voxel size and the coordinates' units")
    return lo, size


def _encode(q: torch.Tensor, lo: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    sx, sy, sz = size
    r = q[:, 1:] - lo
    return ((q[:, 0] * sx + r[:, 0]) * sy + r[:, 1]) * sz + r[:, 2]


class CoordinateManager:
    """Voxel sets of every tensor stride and the cached kernel maps between them.

    Built from the input coordinates (stride 1). Rows are reordered into ascending key order
    internally: `input_order[i]` is the input row of internal row i; `to_input_order` undoes it.
    """

    def __init__(self, coord: torch.Tensor):
        coord = coord.long()
        lo, size = _key_box(coord)
        keys, order = torch.sort(_encode(coord, lo, size), stable=True)
        dup = keys[1:] == keys[:-1]
        if bool(dup.any()):
            raise duplicate_error(coord, order[1:][dup])
        self.device = coord.device
        self.input_order = order
        self._rank: torch.Tensor | None = None
        self._levels: dict[int, _Level] = {1: _Level(1, coord[order], keys, lo, size)}
        self._maps: dict[tuple, KernelMap] = {}

    # ---- voxel sets -------------------------------------------------------------------------

    def num_voxels(self, stride: int) -> int:
        return len(self._level(stride).keys)

    def coordinates(self, stride: int) -> torch.Tensor:
        """(M_s, 4) int64 [batch, x, y, z] of stride s (multiples of s), in internal row order."""
        q = self._level(stride).q.clone()
        q[:, 1:] *= stride
        return q

    def from_input_order(self, feat: torch.Tensor) -> torch.Tensor:
        return feat.index_select(0, self.input_order)

    def to_input_order(self, values: torch.Tensor) -> torch.Tensor:
        """Stride-1 values in internal row order -> the caller's input row order."""
        if self._rank is None:
            rank = torch.empty_like(self.input_order)
            rank[self.input_order] = torch.arange(len(rank), device=rank.device)
            self._rank = rank
        return values.index_select(0, self._rank)

    def _level(self, stride: int) -> _Level:
        if stride not in self._levels:
            if stride < 2 or stride % 2:
                raise ValueError(f"tensor stride {stride} is not a power of two")
            self._downsample(stride // 2)
        return self._levels[stride]

    # ---- kernel maps ------------------------------------------------------------------------

    def conv_map(self, stride: int, kernel_size: int) -> KernelMap:
        """Stride-preserving convolution with an odd kernel: output voxels = input voxels."""
        key = ("conv", stride, kernel_size)
        if key not in self._maps:
            self._maps[key] = self._neighbour_map(self._level(stride), kernel_size)
        return self._maps[key]

    def down_map(self, stride: int) -> KernelMap:
        """Kernel 2, stride 2: each voxel of `stride` feeds its parent at 2 * stride."""
        key = ("down", stride)
        if key not in self._maps:
            self._downsample(stride)
        return self._maps[key]

    def up_map(self, stride: int) -> KernelMap:
        """Transposed kernel 2, stride 2: from `stride` back onto the existing voxels of stride / 2."""
        if stride < 2 or stride % 2:
            raise ValueError(f"cannot up-sample from tensor stride {stride}")
        return self.down_map(stride // 2).transposed()

    def _downsample(self, stride: int) -> None:
        child = self._level(stride)
        q = child.q
        parent_q = torch.cat([q[:, :1], torch.div(q[:, 1:], 2, rounding_mode="floor")], dim=1)
        # offset of the child inside its parent's 2x2x2 cell, x fastest (MinkowskiEngine's order)
        odd = q[:, 1:] & 1
        code = odd[:, 0] + 2 * odd[:, 1] + 4 * odd[:, 2]
        lo, size = _key_box(parent_q)
        keys, parent_of = torch.unique(_encode(parent_q, lo, size), sorted=True, return_inverse=True)
        q2 = parent_q.new_empty(len(keys), 4)
        q2[parent_of] = parent_q  # children of one parent write the same value
        self._levels[2 * stride] = _Level(2 * stride, q2, keys, lo, size)
        rows_by_code = torch.sort(code, stable=True).indices
        counts = torch.bincount(code, minlength=8).tolist()
        pairs = [(w, rows, parent_of[rows]) for w, rows in enumerate(rows_by_code.split(counts)) if len(rows)]
        self._maps[("down", stride)] = KernelMap(len(q), len(keys), pairs)

    @staticmethod
    def _neighbour_map(level: _Level, kernel_size: int) -> KernelMap:
        """All (neighbour, voxel) pairs within a kernel_size^3 window, per offset.

        Only half of the offsets are searched: the pairs of offset -d are those of d swapped.
        Offsets (dx, dy, *) share one binary search for the key of (dx, dy, 0): in the sorted
        keys, z-neighbours sit next to that insertion point, so they are found by walking from
        it one step per existing key, without further searches.
        """
        if kernel_size % 2 != 1 or not 1 <= kernel_size <= 2 * MARGIN + 1:
            raise ValueError(f"stride-preserving kernel size must be odd and <= {2 * MARGIN + 1}, "
                             f"got {kernel_size}")
        keys = level.keys
        m = len(keys)
        r = kernel_size // 2
        k = kernel_size
        _, sy, sz = level.size
        found_pairs: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

        def record(d, hit: torch.Tensor, pos: torch.Tensor) -> None:
            out_rows = torch.nonzero(hit).flatten()
            found_pairs[d] = (pos[out_rows], out_rows)  # (input rows, output rows)

        def walk(d_xy, target: torch.Tensor, start: torch.Tensor, dz_values, step: int) -> None:
            pos = start
            for dz in dz_values:
                p = pos.clamp(0, m - 1)
                hit = (pos >= 0) & (pos < m) & (keys[p] == target + dz)
                record((*d_xy, dz), hit, p)
                pos = pos + step * hit

        rows = torch.arange(m, device=keys.device)
        for dx in range(0, r + 1):
            for dy in range(-r, r + 1):
                if dx == 0 and dy <= 0:
                    continue
                target = keys + (dx * sy + dy) * sz
                start = torch.searchsorted(keys, target)
                walk((dx, dy), target, start, range(0, r + 1), +1)
                walk((dx, dy), target, start - 1, range(-1, -r - 1, -1), -1)
        walk((0, 0), keys, rows + 1, range(1, r + 1), +1)  # the centre column, upwards only

        def weight_index(d):
            return (d[0] + r) + k * (d[1] + r) + k * k * (d[2] + r)

        pairs = []
        for d, (inp, out) in found_pairs.items():
            if len(inp):
                pairs.append((weight_index(d), inp, out))
                pairs.append((weight_index((-d[0], -d[1], -d[2])), out, inp))
        pairs.sort(key=lambda p: p[0])
        return KernelMap(m, m, pairs, identity=weight_index((0, 0, 0)))
