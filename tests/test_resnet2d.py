"""The 2D branch: dilated ResNets, initialisation from ImageNet / local checkpoints, freezing."""

from __future__ import annotations

import os

import pytest
import torch

from rayseg.models._torchvision import import_torchvision
from rayseg.models.resnet2d import ResNet2D, imagenet_weights_path


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, 2-thread ops wait on
    OpenMP barriers for scheduler time slices. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _torchvision_resnet34_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return import_torchvision().models.resnet34(weights=None).state_dict()  # includes fc.*


def _assert_backbone_equals(model: ResNet2D, state: dict[str, torch.Tensor]) -> None:
    own = model.backbone.state_dict()
    checked = [k for k in own if not k.endswith("num_batches_tracked")]
    assert checked and all(torch.equal(own[k], state[k]) for k in checked)


def test_resnet34_forward_backward_at_320x240():
    model = ResNet2D("resnet34", num_classes=20, init="none")
    assert model.feature_dim == 512
    images = torch.randn(1, 3, 240, 320)
    feats, logits = model(images)
    assert feats.shape == (1, 512, 30, 40)  # output stride 8
    assert logits.shape == (1, 20, 240, 320)
    (logits.logsumexp(1).mean() + feats.mean()).backward()
    assert model.classifier.weight.grad is not None and model.classifier.bias is None
    assert model.backbone.conv1.weight.grad is not None
    assert float(model.backbone.layer4[2].conv2.weight.grad.abs().sum()) > 0


def test_resnet50_and_101_are_dilated_with_2048_features():
    for name in ("resnet50", "resnet101"):
        model = ResNet2D(name, num_classes=13, init="none")
        assert model.feature_dim == 2048
        layer3, layer4 = model.backbone.layer3, model.backbone.layer4
        assert layer3[0].conv2.stride == (1, 1) and layer3[1].conv2.dilation == (2, 2)
        assert layer4[0].conv2.dilation == (2, 2) and layer4[1].conv2.dilation == (4, 4)
        assert model.classifier.weight.shape == (13, 2048, 1, 1)
    with torch.no_grad():  # a small image: the stride is 8, the features 2048-d
        feats, logits = model(torch.randn(1, 3, 32, 48))
    assert feats.shape == (1, 2048, 4, 6) and logits.shape == (1, 13, 32, 48)


def test_reference_layout_keeps_the_features_signed():
    torch.manual_seed(0)
    signed = ResNet2D("resnet18", num_classes=20, init="none")
    names = [name for name, _ in signed.backbone.named_children()]
    assert names[:3] == ["conv1", "bn1", "maxpool"]  # the reference's stem: no ReLU
    assert isinstance(signed.backbone.layer4[-1].relu, torch.nn.Identity)
    assert isinstance(signed.backbone.layer4[0].relu, torch.nn.ReLU)  # only the last block loses it
    torch.manual_seed(0)
    rectified = ResNet2D("resnet18", num_classes=20, init="none", signed=False)
    assert [n for n, _ in rectified.backbone.named_children()][:4] == ["conv1", "bn1", "relu", "maxpool"]
    # the same parameters: a checkpoint of either layout loads into the other
    rectified.backbone.load_state_dict(signed.backbone.state_dict())
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        f_signed, logits = signed(images)
        f_rect, _ = rectified(images)
    assert float((f_signed < 0).float().mean()) > 0.2  # layer4 features take negative values
    assert float(f_rect.min()) >= 0.0
    # logits are upsampled with align_corners=True: the image corners are the map's corners
    coarse = signed.classifier(f_signed)
    torch.testing.assert_close(logits[:, :, 0, 0], coarse[:, :, 0, 0])
    torch.testing.assert_close(logits[:, :, -1, -1], coarse[:, :, -1, -1])


def test_basic_block_resnets_dilate_their_first_conv_only():
    for name in ("resnet18", "resnet34"):
        model = ResNet2D(name, num_classes=20, init="none")
        layer3, layer4 = model.backbone.layer3, model.backbone.layer4
        assert layer3[0].conv1.stride == (1, 1) and layer3[0].conv1.dilation == (1, 1)
        assert layer3[1].conv1.dilation == (2, 2) and layer3[1].conv1.padding == (2, 2)
        assert layer4[0].conv1.dilation == (2, 2) and layer4[1].conv1.dilation == (4, 4)
        for block in list(layer3) + list(layer4):
            assert block.conv2.dilation == (1, 1) and block.conv2.padding == (1, 1)
        with torch.no_grad():
            feats, _ = model(torch.randn(1, 3, 32, 48))
        assert feats.shape == (1, 512, 4, 6)  # output stride 8


def test_local_checkpoints_torchvision_dino_and_moco(tmp_path):
    state = _torchvision_resnet34_state(seed=1)
    path = tmp_path / "torchvision.pth"
    torch.save(state, path)
    _assert_backbone_equals(ResNet2D("resnet34", 20, init=str(path)), state)

    dino = {k: v for k, v in _torchvision_resnet34_state(seed=2).items() if not k.startswith("fc.")}
    path = tmp_path / "dino_resnet34.pth"
    torch.save(dino, path)
    _assert_backbone_equals(ResNet2D("resnet34", 20, init=str(path)), dino)

    query, key = _torchvision_resnet34_state(seed=3), _torchvision_resnet34_state(seed=4)
    moco = {"epoch": 200, "arch": "resnet34", "state_dict": {
        **{f"module.encoder_q.{k}": v for k, v in query.items()},
        **{f"module.encoder_k.{k}": v for k, v in key.items()},
        "module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}}
    path = tmp_path / "moco_v2.pth.tar"
    torch.save(moco, path)
    _assert_backbone_equals(ResNet2D("resnet34", 20, init=str(path)), query)


def test_checkpoint_errors_name_the_file_and_parameter(tmp_path):
    state = _torchvision_resnet34_state(seed=5)
    state["layer4.1.conv2.weight"] = torch.zeros(512, 512, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"bad\.pth.*layer4\.1\.conv2\.weight: checkpoint \(512, 512, 1, 1\) "
                                         r"vs model \(512, 512, 3, 3\)"):
        ResNet2D("resnet34", 20, init=str(path))
    del state["layer4.1.conv2.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing: layer4\.1\.conv2\.weight.*unexpected: extra\.weight"):
        ResNet2D("resnet34", 20, init=str(path))
    with pytest.raises(FileNotFoundError, match="model.init_2d: checkpoint file not found: /no/such.pth"):
        ResNet2D("resnet34", 20, init="/no/such.pth")
    with pytest.raises(ValueError, match="unknown 2D backbone 'resnet152'"):
        ResNet2D("resnet152", 20, init="none")


def test_imagenet_init_reads_the_hub_cache_and_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("RAYSEG_OFFLINE", "1")  # no download attempt, whatever the network
    expected = tmp_path / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    assert imagenet_weights_path("resnet34") == str(expected)
    with pytest.raises(RuntimeError) as err:
        ResNet2D("resnet34", 20, init="imagenet")
    msg = str(err.value)
    assert str(expected) in msg and "https://download.pytorch.org/models/resnet34-b627a593.pth" in msg
    # once the file is where the message says, 'imagenet' loads it
    state = _torchvision_resnet34_state(seed=6)
    os.makedirs(expected.parent)
    torch.save(state, expected)
    _assert_backbone_equals(ResNet2D("resnet34", 20, init="imagenet"), state)


def test_frozen_backbone_gets_no_gradients_and_keeps_bn_statistics():
    model = ResNet2D("resnet34", 20, init="none", freeze=True).train()
    assert not model.backbone.training and model.classifier.training
    assert all(not p.requires_grad for p in model.backbone.parameters())
    running_mean = model.backbone.bn1.running_mean.clone()
    feats, logits = model(torch.randn(2, 3, 64, 80))
    logits.mean().backward()
    assert torch.equal(model.backbone.bn1.running_mean, running_mean)
    assert model.classifier.weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())
