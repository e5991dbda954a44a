"""MinkUNet on both sparse backends, weight interchange, and the two-branch model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayseg.config import ModelConfig, replace
from rayseg.models.minkunet import ARCHITECTURES, build_minkunet, load_minkunet_state
from rayseg.models.twobranch import TwoBranchModel, sample_2d
from rayseg.sparse import SparseInputError, get_backend
from rayseg.sparse.surface import scanned_surface_voxels


pytestmark = pytest.mark.usefixtures("one_thread")


def _scene(num_voxels: int, seed: int, batches: int = 1) -> torch.Tensor:
    v = scanned_surface_voxels(num_voxels, seed=seed).astype(np.int64)
    parts = [np.concatenate([np.full((len(v), 1), b), v + 7 * b], axis=1) for b in range(batches)]
    return torch.from_numpy(np.concatenate(parts))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|"""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_variant_has_the_tabled_shapes_and_strides(name):
    layers, planes = ARCHITECTURES[name]
    coord = _scene(400, seed=1, batches=2)
    feat = torch.randn(len(coord), 6)
    model = build_minkunet(name, in_channels=6, num_classes=13)
    seen = {}
    for i in range(1, 9):
        block = getattr(model, f"block{i}")
        assert len(block) == layers[i - 1]
        block.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, (out.stride, out.feats.shape[1])))
    features, logits = model(coord, feat)
    assert model.feature_dim == planes[7] == {"MinkUNet18C": 128}.get(name, 96)
    assert features.shape == (len(coord), model.feature_dim) and logits.shape == (len(coord), 13)
    assert seen == {i + 1: (s, planes[i]) for i, s in enumerate((2, 4, 8, 16, 8, 4, 2, 1))}
    assert model.final.bias is not None and model.conv0p1s1.kernel.shape == (125, 6, 32)


def test_minkowski_backend_matches_torch_backend_forward_and_gradients():
    """Same weights, a 20k-voxel scanned-surface scene: the backends compute the same function.

    float64 in training mode (batch statistics): outputs and every gradient to 1e-4 relative
    (measured ~1e-13, i.e. the same arithmetic). float32: outputs to 1e-4 in both BN modes
    (measured ~5e-6). float32 gradients are not compared: summation order (MKL vs OpenBLAS)
    moves some of them by up to ~1e-2 relative where they are sums of cancelling terms.
    MinkowskiEngine missing is a failure here, not a skip.
    """
    get_backend("minkowski")  # raises BackendUnavailable with the import error
    coord = _scene(20000, seed=3)
    gen = torch.Generator().manual_seed(0)
    feat = torch.rand(len(coord), 6, generator=gen, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 20, (len(coord),), generator=gen)
    torch.manual_seed(0)
    torch_net = build_minkunet("MinkUNet14A", 6, 20, backend="torch")  # every layer type, half the blocks
    me_net = build_minkunet("MinkUNet14A", 6, 20, backend="minkowski")
    assert [(k, v.shape) for k, v in torch_net.state_dict().items()] == \
           [(k, v.shape) for k, v in me_net.state_dict().items()]
    load_minkunet_state(me_net, torch_net.state_dict())  # torch -> MinkowskiEngine

    def run(net, dtype, train):
        net.to(dtype).train(train).zero_grad()
        f = feat.to(dtype).detach().clone().requires_grad_(True)
        features, logits = net(coord, f)
        F.cross_entropy(logits, labels).backward()
        return [features.detach(), logits.detach(), f.grad] + [p.grad.clone() for p in net.parameters()]

    t64, m64 = run(torch_net, torch.float64, True), run(me_net, torch.float64, True)
    assert len(t64) == len(m64) == 3 + len(list(torch_net.parameters()))
    assert all(g is not None and bool(g.abs().max() > 0) for g in t64[2:])
    worst = max(_rel(a, b) for a, b in zip(t64, m64))
    assert worst < 1e-4, worst
    with torch.no_grad():
        for train in (True, False):
            torch_net.float().train(train)
            me_net.float().train(train)
            f32 = feat.float()
            for a, b in zip(torch_net(coord, f32), me_net(coord, f32)):
                assert _rel(a, b) < 1e-4


def test_minkowski_state_dict_loads_into_torch_backend():
    """MinkowskiEngine -> torch: the ME network's own initial weights, no permutation needed."""
    coord = _scene(1500, seed=4)
    feat = torch.randn(len(coord), 6)
    torch.manual_seed(1)
    me_net = build_minkunet("MinkUNet14A", 6, 20, backend="minkowski").eval()
    torch_net = build_minkunet("MinkUNet14A", 6, 20, backend="torch").eval()
    state = {f"module.{k}": v for k, v in me_net.state_dict().items()}  # a DDP-saved checkpoint
    load_minkunet_state(torch_net, {"state_dict": state})
    with torch.no_grad():
        out_me, out_torch = me_net(coord, feat), torch_net(coord, feat)
    assert _rel(out_torch[0], out_me[0]) < 1e-4 and _rel(out_torch[1], out_me[1]) < 1e-4


def test_checkpoint_with_mismatched_shapes_names_the_parameter(tmp_path):
    model = build_minkunet("MinkUNet18A", 6, 20)
    wider = build_minkunet("MinkUNet18C", 6, 20).state_dict()
    with pytest.raises(ValueError, match=r"block5\.0\.conv1\.kernel: checkpoint \(27, 320, 192\) vs model \(27, 256, 128\)"):
        load_minkunet_state(model, wider)
    other_classes = build_minkunet("MinkUNet18A", 6, 13).state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": other_classes}, path)
    with pytest.raises(ValueError, match=rf"{path}.*final\.kernel: checkpoint \(96, 13\) vs model \(96, 20\)"):
        load_minkunet_state(model, str(path))
    fewer = dict(model.state_dict())
    fewer.pop("bn0.bn.weight")
    with pytest.raises(ValueError, match=r"missing: bn0\.bn\.weight"):
        load_minkunet_state(model, fewer)


def test_forward_and_backward_are_deterministic():
    coord = _scene(3000, seed=5, batches=2)
    feat = torch.randn(len(coord), 6)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_minkunet("MinkUNet14A", 6, 20)
        features, logits = model(coord, feat)
        (features.square().mean() + logits.logsumexp(1).mean()).backward()
        runs.append([features, logits] + [p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_input_order_is_kept_and_bad_scenes_fail_clearly():
    model = build_minkunet("MinkUNet14A", 6, 20).eval()
    coord = _scene(800, seed=6)
    feat = torch.randn(len(coord), 6)
    perm = torch.randperm(len(coord))
    with torch.no_grad():
        _, logits = model(coord, feat)
        _, logits_perm = model(coord[perm], feat[perm])
        torch.testing.assert_close(logits_perm, logits[perm], rtol=1e-5, atol=1e-5)
        # a single voxel runs in eval mode; in training mode BN needs two voxels
        features, logits = model(coord[:1], feat[:1])
        assert features.shape == (1, 96) and bool(torch.isfinite(logits).all())
    with pytest.raises(ValueError, match="at least 2 voxels"):
        model.train()(coord[:1], feat[:1])
    with pytest.raises(SparseInputError, match="empty input"):
        model(coord[:0], feat[:0])
    bad = feat.clone()
    bad[5, 0] = float("inf")
    with pytest.raises(SparseInputError, match="NaN/Inf features, first at row 5"):
        model(coord, bad)
    with pytest.raises(SparseInputError, match="duplicate voxel"):
        model(torch.cat([coord, coord[:3]]), torch.cat([feat, feat[:3]]))
    with pytest.raises(ValueError, match="unknown MinkUNet variant 'MinkUNet50'"):
        build_minkunet("MinkUNet50", 6, 20)
    with pytest.raises(ValueError, match="unknown sparse backend 'mink'"):
        build_minkunet("MinkUNet14A", 6, 20, backend="mink")


def test_two_branch_model_heads_and_pixel_sampling():
    cfg = ModelConfig(backbone_3d="MinkUNet14A", backbone_2d="resnet34", init_2d="none")
    model = TwoBranchModel(cfg, num_classes=20)
    assert (model.proj3d.in_features, model.proj3d.out_features) == (96, 512)
    assert (model.proj2d.in_features, model.proj2d.out_features) == (512, 96)
    coord = _scene(1000, seed=8)
    out3d = model.forward_3d(coord, torch.randn(len(coord), 6))  # no images involved
    assert out3d["feat"].shape == (len(coord), 96) and out3d["logits"].shape == (len(coord), 20)
    out2d = model.forward_2d(torch.randn(2, 3, 48, 64))
    assert out2d["feat"].shape == (2, 512, 6, 8) and out2d["logits"].shape == (2, 20, 48, 64)
    p3 = model.project_3d(out3d["feat"][:10])
    p2 = model.project_2d(out2d["feat"][0, :, 0, :8].T)
    assert p3.shape == (10, 512) and p2.shape == (8, 96)
    torch.testing.assert_close(p3.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(p2.norm(dim=1), torch.ones(8))
    # the reference reads pixel (row, col) of a W x H image at feature-map position
    # (col (w - 1) / W, row (h - 1) / H), bilinearly (grid_sample, align_corners=True)
    fmap = torch.randn(3, 5, 30, 40, dtype=torch.float64, requires_grad=True)
    view = torch.tensor([2, 0, 1, 2, 0, 0])
    pixel = torch.tensor([0, 319, 239 * 320, 240 * 320 - 1, 12345, 777])
    sampled = sample_2d(fmap, view, pixel, (240, 320))
    for k in range(len(view)):
        y, x = (pixel[k] // 320).item() * 29 / 240, (pixel[k] % 320).item() * 39 / 320
        y0, x0 = int(y), int(x)
        dy, dx = y - y0, x - x0
        m = fmap[view[k]].detach()
        expected = ((1 - dy) * (1 - dx) * m[:, y0, x0] + (1 - dy) * dx * m[:, y0, min(x0 + 1, 39)]
                    + dy * (1 - dx) * m[:, min(y0 + 1, 29), x0] + dy * dx * m[:, min(y0 + 1, 29), min(x0 + 1, 39)])
        torch.testing.assert_close(sampled[k].detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sampled[0].detach(), fmap[2, :, 0, 0].detach())  # pixel (0, 0) = cell (0, 0)
    sampled.sum().backward()
    assert fmap.grad is not None and bool((fmap.grad[1] != 0).any())
    with pytest.raises(ValueError, match="pixel_flat out of range"):
        sample_2d(fmap, view, pixel + 240 * 320, (240, 320))


def test_model_config_can_start_the_3d_branch_from_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    source = build_minkunet("MinkUNet14A", 6, 20)
    path = tmp_path / "net3d.pth"
    torch.save(source.state_dict(), path)
    cfg = ModelConfig(backbone_3d="MinkUNet14A", backbone_2d="resnet34", init_2d="none", init_3d=str(path))
    model = TwoBranchModel(cfg, num_classes=20)
    for k, v in source.state_dict().items():
        assert torch.equal(model.net3d.state_dict()[k], v), k


def test_2d_backbone_learning_rate_scale_is_a_second_parameter_group():
    """optim.lr_scale_2d_backbone: the 2D backbone steps at scale x the stage lr, everything else
    (3D branch, 2D classifier, projections) at the stage lr; 1 keeps the reference's single group."""
    from rayseg.config import Config
    from rayseg.train.loop import make_optimizer

    cfg = Config(model=ModelConfig(backbone_3d="MinkUNet14A", backbone_2d="resnet18", init_2d="none"))
    model = TwoBranchModel(cfg.model, num_classes=20)
    single = make_optimizer(model, cfg, "cmg")
    assert len(single.param_groups) == 1 and single.param_groups[0]["lr_scale"] == 1.0
    scaled_cfg = replace(cfg, **{"optim.lr_scale_2d_backbone": 0.1})
    opt = make_optimizer(model, scaled_cfg, "cmg")
    rest, backbone = opt.param_groups
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.net2d.backbone.parameters()}
    assert len(rest["params"]) + len(backbone["params"]) == len(list(model.parameters()))
    assert any(p is model.net2d.classifier.weight for p in rest["params"])
    # one plain SGD step (no momentum yet, no decay): the step size follows the group's lr
    cfg_plain = replace(scaled_cfg, **{"optim.weight_decay": 0.0})
    opt = make_optimizer(model, cfg_plain, "cmg")
    for group in opt.param_groups:
        group["lr"] = 0.5 * group["lr_scale"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    torch.testing.assert_close(before["net2d.backbone.conv1.weight"] - model.net2d.backbone.conv1.weight,
                               torch.full_like(before["net2d.backbone.conv1.weight"], 0.05))
    torch.testing.assert_close(before["proj3d.weight"] - model.proj3d.weight, torch.full_like(model.proj3d.weight, 0.5))


def test_2d_branch_in_bfloat16_autocast_returns_float32_close_to_float32():
    """model.autocast_2d = 'bfloat16': same weights, float32 outputs within bfloat16's precision of
    the float32 branch (and not equal to it: the convolutions really ran in bfloat16); gradients
    reach every backbone parameter in float32."""
    torch.manual_seed(0)
    base = ModelConfig(backbone_3d="MinkUNet14A", backbone_2d="resnet18", init_2d="none")
    fp32 = TwoBranchModel(base, num_classes=5).eval()
    bf16 = TwoBranchModel(replace_model(base, autocast_2d="bfloat16"), num_classes=5).eval()
    bf16.load_state_dict(fp32.state_dict())
    images = torch.randn(2, 3, 48, 64)
    f32, l32 = fp32.forward_2d(images).values()
    out = bf16.forward_2d(images)
    fbf, lbf = out["feat"], out["logits"]
    assert fbf.dtype == lbf.dtype == torch.float32 and lbf.shape == l32.shape == (2, 5, 48, 64)
    for a, b in ((fbf, f32), (lbf, l32)):
        rel = float((a - b).norm() / b.norm())
        assert 1e-5 < rel < 5e-2, rel
    bf16.train()
    bf16.forward_2d(images)["logits"].square().mean().backward()
    grads = [p.grad for p in bf16.net2d.backbone.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="autocast"):
        from rayseg.models.resnet2d import ResNet2D
        ResNet2D("resnet18", 5, init="none", autocast="float16")


def replace_model(cfg: ModelConfig, **changes) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)
