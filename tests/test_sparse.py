"""The sparse-convolution layer: kernel maps, the hand-written backward, input checks, backends."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rayseg.sparse import (BACKENDS, SparseInputError, check_input, get_backend, minkowski_status,
                           to_points)
from rayseg.sparse import torch_backend as tb
from rayseg.sparse.coords import CoordinateManager
from rayseg.sparse.surface import scanned_surface_voxels


pytestmark = pytest.mark.usefixtures("one_thread")


def _two_scenes(n: int, seed: int = 0) -> torch.Tensor:
    """(M, 4) [batch, x, y, z]: a surface scene and a shifted copy of part of it in batch 1."""
    v = scanned_surface_voxels(n, seed=seed).astype(np.int64)
    b0 = np.concatenate([np.zeros((len(v), 1), np.int64), v], axis=1)
    b1 = np.concatenate([np.ones((len(v) // 3, 1), np.int64), v[: len(v) // 3] + 3], axis=1)
    return torch.from_numpy(np.concatenate([b0, b1]))


def _brute_force_conv_pairs(coords: list[list[int]], stride: int, kernel_size: int) -> dict[int, set]:
    """weight index -> {(input row, output row)}: the neighbour at offset d * stride of each
    voxel, offsets enumerated x fastest (MinkowskiEngine's order)."""
    where = {tuple(c): i for i, c in enumerate(coords)}
    r = kernel_size // 2
    pairs = {}
    for w, (dz, dy, dx) in enumerate(itertools.product(range(-r, r + 1), repeat=3)):
        pairs[w] = {(where[n], o) for o, (b, x, y, z) in enumerate(coords)
                    if (n := (b, x + dx * stride, y + dy * stride, z + dz * stride)) in where}
    return pairs


def _pairs_of(kmap) -> dict[int, set]:
    got: dict[int, set] = {}
    for w, rows_in, rows_out in kmap.pairs:
        got.setdefault(w, set()).update(zip(rows_in.tolist(), rows_out.tolist()))
    if kmap.identity is not None:
        got.setdefault(kmap.identity, set()).update((i, i) for i in range(kmap.num_in))
    return got


def test_neighbour_maps_match_brute_force_at_every_stride():
    coord = _two_scenes(700, seed=1)  # negative coordinates included
    assert int(coord[:, 1:].min()) < 0
    manager = CoordinateManager(coord)
    for stride in (1, 2, 4):
        coords = manager.coordinates(stride).tolist()
        for kernel_size in (3, 5):
            expected = _brute_force_conv_pairs(coords, stride, kernel_size)
            got = _pairs_of(manager.conv_map(stride, kernel_size))
            assert {w: p for w, p in got.items() if p} == {w: p for w, p in expected.items() if p}
        # down-sampling: parent = floor(coordinate / 2s) * 2s, weight = child offset, x fastest
        parents = manager.coordinates(2 * stride).tolist()
        where = {tuple(c): i for i, c in enumerate(parents)}
        expected_down: dict[int, set] = {}
        for i, (b, x, y, z) in enumerate(coords):
            p = (b, *((c // (2 * stride)) * 2 * stride for c in (x, y, z)))
            ox, oy, oz = ((c - pc) // stride for c, pc in zip((x, y, z), p[1:]))
            expected_down.setdefault(ox + 2 * oy + 4 * oz, set()).add((i, where[p]))
        assert set(map(tuple, parents)) == {(b, *((c // (2 * stride)) * 2 * stride for c in xyz))
                                             for b, *xyz in coords}
        assert _pairs_of(manager.down_map(stride)) == expected_down
        up = _pairs_of(manager.up_map(2 * stride))
        assert up == {w: {(o, i) for i, o in p} for w, p in expected_down.items()}
    # coordinates are multiples of the stride, rows unique, maps cached (built once)
    for stride in (1, 2, 4, 8):
        c = manager.coordinates(stride)
        assert bool((c[:, 1:] % stride == 0).all()) and len(torch.unique(c, dim=0)) == len(c)
    assert manager.conv_map(2, 3) is manager.conv_map(2, 3)


def test_custom_backward_passes_float64_gradcheck():
    coord = _two_scenes(40, seed=2)
    manager = CoordinateManager(coord)
    n = len(coord)
    gen = torch.Generator().manual_seed(0)
    cases = [  # (kernel map, input rows, kernel volume, gradcheck fast mode)
        (manager.conv_map(1, 3), n, 27, False),
        (manager.conv_map(1, 5), n, 125, True),  # full mode: 2 x 800 forwards, seconds
        (manager.down_map(1), n, 8, False),
        (manager.up_map(2), manager.num_voxels(2), 8, False),
    ]
    for kmap, rows, volume, fast in cases:
        feats = torch.randn(rows, 3, dtype=torch.float64, generator=gen, requires_grad=True)
        kernel = torch.randn(volume, 3, 2, dtype=torch.float64, generator=gen, requires_grad=True)
        assert torch.autograd.gradcheck(lambda f, k: tb.sparse_conv(f, k, kmap), (feats, kernel),
                                        fast_mode=fast)


def _maps_of(manager):
    """(name, kernel map, input rows, kernel volume) of every kind the network uses."""
    return [("conv3", manager.conv_map(1, 3), manager.num_voxels(1), 27),
            ("conv5", manager.conv_map(1, 5), manager.num_voxels(1), 125),
            ("down", manager.down_map(1), manager.num_voxels(1), 8),
            ("up", manager.up_map(2), manager.num_voxels(2), 8)]


def test_chunk_plans_hold_every_pair_once_in_its_block():
    manager = CoordinateManager(_two_scenes(100, seed=8))
    for name, kmap, _, _ in _maps_of(manager):
        for side in ("out", "in"):
            for rows in (1, 7, 64, 10**6):
                plan = kmap.chunked(side, rows)
                assert kmap.chunked(side, rows) is plan  # cached
                got = set()
                for c, block in enumerate(plan.blocks):
                    a, b = plan.bounds(c)
                    for w, far, local in block:
                        assert len(far) <= plan.max_pairs and bool((local >= 0).all()) and bool((local < b - a).all())
                        this = (local + a).tolist()
                        got.update((w, f, t) if side == "out" else (w, t, f) for f, t in zip(far.tolist(), this))
                expected = {(w, i, o) for w, ii, oo in kmap.pairs for i, o in zip(ii.tolist(), oo.tolist())}
                assert got == expected, (name, side, rows)


@pytest.mark.parametrize("chunk_rows", [None, 7, 64, 10**6])  # default, M not a multiple, one block
def test_blocked_conv_equals_per_offset_and_passes_float64_gradcheck(chunk_rows):
    coord = _two_scenes(40, seed=9)
    manager = CoordinateManager(coord)
    gen = torch.Generator().manual_seed(1)
    for name, kmap, rows, volume in _maps_of(manager):
        feats = torch.randn(rows, 3, dtype=torch.float64, generator=gen, requires_grad=True)
        kernel = torch.randn(volume, 3, 2, dtype=torch.float64, generator=gen, requires_grad=True)

        def blocked(f, k):
            return tb.sparse_conv(f, k, kmap, chunk_rows=chunk_rows)

        results = []
        for fn in (blocked, lambda f, k: tb.sparse_conv(f, k, kmap, method="per_offset")):
            y = fn(feats, kernel)
            weights = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
            results.append([y, *torch.autograd.grad((y * weights).sum(), (feats, kernel))])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        if chunk_rows in (None, 7):  # the other block sizes: equal to the reference is enough
            assert torch.autograd.gradcheck(blocked, (feats, kernel), fast_mode=name == "conv5"), name


def test_blocked_conv_single_voxel_empty_maps_and_frozen_inputs():
    # one voxel: the stride-1 map has no pairs besides the centre; down/up maps have one pair
    one = CoordinateManager(torch.tensor([[0, 3, -2, 5]]))
    gen = torch.Generator().manual_seed(3)
    for name, kmap, rows, volume in _maps_of(one):
        assert (name in ("down", "up")) == bool(kmap.pairs)
        feats = torch.randn(rows, 2, dtype=torch.float64, generator=gen, requires_grad=True)
        kernel = torch.randn(volume, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
        for chunk_rows in (None, 1, 5):
            assert torch.autograd.gradcheck(lambda f, k: tb.sparse_conv(f, k, kmap, chunk_rows=chunk_rows),
                                            (feats, kernel))
    # a map with no pairs at all and no centre: zero output, zero weight gradient
    empty = tb.KernelMap(4, 3, [])
    feats = torch.randn(4, 2, requires_grad=True)
    kernel = torch.randn(8, 2, 3, requires_grad=True)
    y = tb.sparse_conv(feats, kernel, empty, chunk_rows=2)
    assert y.shape == (3, 3) and not bool(y.any())
    y.sum().backward()
    assert not bool(feats.grad.any()) and not bool(kernel.grad.any())
    # only one of the two inputs needs a gradient (the network's first layer: features frozen)
    manager = CoordinateManager(_two_scenes(40, seed=10))
    kmap = manager.conv_map(1, 3)
    f = torch.randn(manager.num_voxels(1), 3, dtype=torch.float64)
    k = torch.randn(27, 3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda k: tb.sparse_conv(f, k, kmap, chunk_rows=16), (k.requires_grad_(),))
    assert torch.autograd.gradcheck(lambda f: tb.sparse_conv(f, k.detach(), kmap, chunk_rows=16),
                                    (f.requires_grad_(),))


def test_sparse_conv_equals_dense_reference():
    """The layer computes out[o] = sum_w feats[in] @ kernel[w] over the brute-force pairs."""
    coord = _two_scenes(300, seed=4)
    x = tb.make_input(coord, torch.randn(len(coord), 4, dtype=torch.float64))
    conv = tb.Conv(4, 5, kernel_size=3).double()
    y = conv(x)
    coords = x.coordinates.tolist()
    expected = torch.zeros(len(coords), 5, dtype=torch.float64)
    for w, pairs in _brute_force_conv_pairs(coords, 1, 3).items():
        for i, o in pairs:
            expected[o] += x.feats[i] @ conv.kernel[w]
    torch.testing.assert_close(y.feats, expected, rtol=1e-12, atol=1e-12)
    # features() returns rows in the caller's order
    assert torch.equal(tb.features(x), x.manager.to_input_order(x.feats))
    assert torch.equal(x.manager.to_input_order(x.manager.coordinates(1)), coord)


def test_backward_keeps_no_per_offset_copies():
    """Saved for backward: the layer input and the kernel only, whatever the kernel volume."""
    coord = _two_scenes(500, seed=5)
    x = tb.make_input(coord, torch.randn(len(coord), 8))
    x = x.replace(x.feats.detach().requires_grad_(True))
    conv = tb.Conv(8, 8, kernel_size=5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = conv(x)
    assert sorted(saved) == sorted([x.feats.shape, conv.kernel.shape])
    y.feats.sum().backward()
    assert x.feats.grad.shape == x.feats.shape


def test_input_checks_name_the_problem():
    good_coord = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    good_feat = torch.randn(3, 2)
    with pytest.raises(SparseInputError, match="empty input"):
        tb.make_input(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 2))
    with pytest.raises(SparseInputError, match=r"coord: expected integer .*\(M, 4\)"):
        tb.make_input(good_coord.float(), good_feat)
    with pytest.raises(SparseInputError, match="feat: expected float features of shape"):
        tb.make_input(good_coord, torch.randn(2, 2))
    with pytest.raises(SparseInputError, match="takes 3 input channels, got 2"):
        tb.make_input(good_coord, good_feat, in_channels=3)
    bad = good_feat.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(SparseInputError, match="1 voxel.* with NaN/Inf features, first at row 2"):
        tb.make_input(good_coord, bad)
    dup = torch.tensor([[0, 5, 5, 5], [0, 1, 2, 3], [0, 5, 5, 5], [1, 5, 5, 5]])
    with pytest.raises(SparseInputError, match=r"1 duplicate voxel .*\[0, 5, 5, 5\] at row 2"):
        tb.make_input(dup, torch.randn(4, 2))
    with pytest.raises(SparseInputError, match="batch index"):
        check_input(torch.tensor([[-1, 0, 0, 0]]), torch.randn(1, 2))
    # numpy inputs are accepted as they are
    c, f = check_input(good_coord.numpy().astype(np.int32), good_feat.numpy())
    assert c.dtype == torch.int64 and f.dtype == torch.float32


def test_to_points_maps_voxel_values_back_through_inverse():
    values = torch.tensor([[1.0], [2.0], [3.0]])
    inverse = np.array([2, 0, 0, 1, 2])
    assert to_points(values, inverse).flatten().tolist() == [3.0, 1.0, 1.0, 2.0, 3.0]


def test_unknown_backend_lists_available_and_minkowski_status():
    assert set(BACKENDS) == {"torch", "minkowski"}
    with pytest.raises(ValueError) as err:
        get_backend("spconv")
    msg = str(err.value)
    assert "'spconv'" in msg and "torch, minkowski" in msg and "minkowski is" in msg
    assert minkowski_status() in msg
    assert get_backend("torch") is tb


def test_minkowski_enumerates_kernel_offsets_x_fastest():
    """The offset order both backends share, checked on MinkowskiEngine itself: one voxel at the
    origin through a 1->1 conv whose weight w is the number w; the output at p reads the input
    at p + offset(w), so it carries the index of offset -p."""
    me = get_backend("minkowski").ME
    x = me.SparseTensor(torch.ones(1, 1), torch.zeros(1, 4, dtype=torch.int32))
    for k in (3, 5):
        conv = me.MinkowskiConvolution(1, 1, kernel_size=k, dimension=3, expand_coordinates=True)
        with torch.no_grad():
            conv.kernel.copy_(torch.arange(k**3, dtype=torch.float32).view(-1, 1, 1))
        y = conv(x)
        r = k // 2
        for (b, px, py, pz), w in zip(y.C.tolist(), y.F.flatten().round().long().tolist()):
            assert w == (-px + r) + k * (-py + r) + k * k * (-pz + r)


@pytest.mark.gpu
def test_torch_backend_cuda_matches_cpu():
    assert torch.cuda.is_available(), "the gpu marker needs a CUDA device"
    from rayseg.models.minkunet import build_minkunet

    v = scanned_surface_voxels(20000, seed=7)
    coord = torch.from_numpy(np.c_[np.zeros(len(v), np.int64), v])
    gen = torch.Generator().manual_seed(0)
    feat = torch.rand(len(v), 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 20, (len(v),), generator=gen)
    torch.manual_seed(0)
    model = build_minkunet("MinkUNet18A", 6, 20).double()
    results = []
    for device in ("cpu", "cuda"):
        model.to(device).zero_grad()
        f = feat.to(device).requires_grad_(True)
        features, logits = model(coord.to(device), f)
        torch.nn.functional.cross_entropy(logits, labels.to(device)).backward()
        results.append([t.detach().cpu() for t in (features, logits, f.grad)]
                       + [p.grad.cpu() for p in model.parameters()])
    for cpu, cuda in zip(*results):
        assert float((cpu - cuda).abs().max() / cpu.abs().max().clamp_min(1e-30)) < 1e-8


def test_bench_model_cli_runs_a_backend_in_a_subprocess(capsys):
    from rayseg.cli import main

    assert main(["bench-model", "--voxels", "1500", "--repeats", "1", "--backends", "torch", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "1 threads" in out and "peak RSS" in out
