"""The 2D branch: a dilated torchvision ResNet (output stride 8) with a 1x1 classifier.

forward(images (B, 3, H, W)) -> (features (B, D, ceil(H/8), ceil(W/8)) from layer4,
logits (B, C, H, W) from a bias-free 1x1 conv, bilinearly upsampled to the image size with
align_corners=True, as the reference does).

Layout (`signed`, config `model.signed_2d_features`): the reference's stem is conv1 -> bn1 ->
maxpool without a ReLU, and the last block of layer4 has its ReLU replaced by the identity
(torchvision blocks call one `relu` module after each conv and after the sum, so all of them go).
The features that guidance compares are then signed, not rectified. BasicBlock ResNets (18, 34)
are dilated as torchvision dilates Bottleneck ones: only the first 3x3 conv of a block dilates.

Initialisation (`init`, config `model.init_2d`):
  'imagenet'  torchvision's IMAGENET1K_V1 weights, read from the torch hub cache
              ($TORCH_HOME/hub/checkpoints/<file>) or downloaded there; offline, or with
              RAYSEG_OFFLINE=1, a missing file is an error naming the file to place there;
  'none'      torchvision's random initialisation;
  <path>      a local state dict: torchvision's, DINO's (plain backbone keys) or MoCo's
              ('state_dict' with 'module.encoder_q.' keys); classifier heads (fc) are ignored.
`init_classifier`: also the 1x1 classifier, from `classifier.weight` of a per-pixel stand-in
(rayseg/pretrain2d.py, task 'pixels'; a diagnostic: the branch starts out segmenting).
`freeze` (Table 7 'frozen'): the backbone gets no gradients and its BN layers stay in eval mode.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from rayseg.models._torchvision import import_torchvision

__all__ = ["ResNet2D", "FEATURE_DIMS", "backbone_state_from_checkpoint", "imagenet_weights_path"]

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
_WEIGHTS_ENUMS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
                  "resnet101": "ResNet101_Weights"}
_BACKBONE_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _imagenet_weights(name: str):
    return getattr(import_torchvision().models, _WEIGHTS_ENUMS[name]).IMAGENET1K_V1


def imagenet_weights_path(name: str) -> str:
    """Where torch's hub cache keeps (or would keep) the ImageNet weights of `name`."""
    filename = os.path.basename(_imagenet_weights(name).url)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _load_imagenet_state(name: str) -> dict[str, torch.Tensor]:
    weights = _imagenet_weights(name)
    path = imagenet_weights_path(name)
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    reason = "RAYSEG_OFFLINE is set"
    if not os.environ.get("RAYSEG_OFFLINE"):
        try:
            return weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # no network, proxy, bad download...
            reason = f"{type(exc).__name__}: {exc}"
    raise RuntimeError(
        f"ImageNet weights for {name} are not available ({reason}). Download {weights.url} and "
        f"place it at {path} (the torch hub cache; TORCH_HOME moves it), or set model.init_2d "
        f"to 'none' or to a local checkpoint path")


def backbone_state_from_checkpoint(raw: Mapping) -> dict[str, torch.Tensor]:
    """Backbone parameters (torchvision names, no 'fc') from a torchvision / DINO / MoCo state dict."""
    state = raw
    for wrapper in ("state_dict", "model"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if any(k.startswith("module.encoder_q.") for k in state):  # MoCo: the query encoder
        state = {k[len("module.encoder_q."):]: v for k, v in state.items() if k.startswith("module.encoder_q.")}
    else:
        stripped = {}
        for k, v in state.items():
            for prefix in ("module.", "backbone.", "net2d.backbone."):
                if k.startswith(prefix):
                    k = k[len(prefix):]
            stripped[k] = v
        state = stripped
    return {k: v for k, v in state.items()
            if isinstance(v, torch.Tensor) and not k.startswith(("fc.", "classifier."))}


def _dilate_basic_blocks(net: nn.Module) -> None:
    """Output stride 8 for BasicBlock ResNets, as `replace_stride_with_dilation=[False, True,
    True]` does for Bottleneck ones (torchvision refuses dilation in BasicBlock): layer3 and
    layer4 lose their stride; a block's first 3x3 conv takes the dilation (that of the previous
    stage for a stage's first block, 2 in layer3, 4 in layer4 otherwise) and its second stays a
    plain 3x3, as in the reference's BasicBlock."""
    dilation = 1
    for layer in (net.layer3, net.layer4):
        previous, dilation = dilation, dilation * 2
        for i, block in enumerate(layer):
            d = previous if i == 0 else dilation
            block.conv1.stride, block.conv1.dilation, block.conv1.padding = (1, 1), (d, d), (d, d)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)


class ResNet2D(nn.Module):
    """Dilated ResNet-18/34/50/101 (output stride 8) + bias-free 1x1 classifier."""

    def __init__(self, name: str = "resnet50", num_classes: int = 20, init: str = "imagenet",
                 freeze: bool = False, signed: bool = True, autocast: str = "none", init_classifier: bool = False):
        super().__init__()
        if name not in FEATURE_DIMS:
            raise ValueError(f"unknown 2D backbone {name!r}; available: {', '.join(FEATURE_DIMS)}")
        if init_classifier and init in ("imagenet", "none"):  # before any weights load
            raise ValueError(f"init_classifier: init {init!r} holds no classifier (give a per-pixel stand-in file)")
        tv = import_torchvision()
        if name in ("resnet18", "resnet34"):
            net = getattr(tv.models, name)(weights=None)
            _dilate_basic_blocks(net)
        else:
            net = getattr(tv.models, name)(weights=None, replace_stride_with_dilation=[False, True, True])
        self.name, self.init, self.frozen, self.signed = name, init, freeze, signed
        if autocast not in ("none", "bfloat16"):
            raise ValueError(f"autocast: expected 'none' or 'bfloat16', got {autocast!r}")
        self.autocast = autocast
        self.feature_dim = FEATURE_DIMS[name]
        layers = [k for k in _BACKBONE_LAYERS if not (signed and k == "relu")]  # no parameters: same keys
        self.backbone = nn.Sequential(OrderedDict((k, getattr(net, k)) for k in layers))
        if signed:
            self.backbone.layer4[-1].relu = nn.Identity()
        self.classifier = nn.Conv2d(self.feature_dim, num_classes, kernel_size=1, bias=False)
        if init == "imagenet":
            self.load_backbone(backbone_state_from_checkpoint(_load_imagenet_state(name)),
                               f"torchvision ImageNet weights for {name}")
        elif init != "none":
            if not os.path.isfile(init):
                raise FileNotFoundError(f"model.init_2d: checkpoint file not found: {init} "
                                        "(expected 'imagenet', 'none' or a state dict path)")
            raw = torch.load(init, map_location="cpu", weights_only=True)
            self.load_backbone(backbone_state_from_checkpoint(raw), init)
            if init_classifier:
                self.load_classifier(raw, init)
        if freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def load_backbone(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Load torchvision-named backbone parameters; errors name every mismatched parameter."""
        own = self.backbone.state_dict()
        wanted = {k for k in own if not k.endswith("num_batches_tracked")}
        given = {k for k in state if not k.endswith("num_batches_tracked")}
        problems = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in sorted(wanted & given) if tuple(state[k].shape) != tuple(own[k].shape)]
        if wanted - given:
            problems.append(f"missing: {', '.join(sorted(wanted - given)[:10])}")
        if given - wanted:
            problems.append(f"unexpected: {', '.join(sorted(given - wanted)[:10])}")
        if problems:
            raise ValueError(f"{source} does not fit the {self.name} backbone: " + "; ".join(problems))
        self.backbone.load_state_dict(dict(state), strict=False)

    def load_classifier(self, raw: Mapping, source: str) -> None:
        """The 1x1 classifier from `classifier.weight` of a per-pixel stand-in (same classes)."""
        weight = raw.get("classifier.weight")
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(self.classifier.weight.shape):
            found = "none" if weight is None else tuple(getattr(weight, "shape", ()))
            raise ValueError(f"{source}: no classifier.weight of shape {tuple(self.classifier.weight.shape)} "
                             f"(found {found}); only a per-pixel stand-in of these classes "
                             "(pretrain_2d.task = 'pixels') holds one")
        with torch.no_grad():
            self.classifier.weight.copy_(weight)

    def train(self, mode: bool = True) -> "ResNet2D":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # frozen = fixed BN statistics too
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W), got shape {tuple(images.shape)}")
        if self.autocast == "bfloat16":
            with torch.autocast(images.device.type, dtype=torch.bfloat16):
                feats = self.backbone(images)
                coarse = self.classifier(feats)
            feats, coarse = feats.float(), coarse.float()  # everything after the convolutions in float32
        else:
            feats = self.backbone(images)
            coarse = self.classifier(feats)
        logits = F.interpolate(coarse, size=images.shape[-2:], mode="bilinear", align_corners=True)
        return feats, logits
