"""MinkUNet14A / 18A / 18C / 34C, written once against the rayseg.sparse interface.

The layout follows METHOD.md (MinkowskiEngine's MinkUNet): stem conv kernel 5, four encoder
stages (down conv kernel 2 stride 2 + BasicBlocks), four decoder stages (transposed conv
kernel 2 stride 2 + skip concatenation + BasicBlocks), INIT_DIM 32, a final 1x1 conv with bias.
Module and parameter names are MinkowskiEngine's (conv0p1s1, bn0, block1.0.conv1, ...,
final), so state dicts move between the two backends, and from reference checkpoints, as they
are (`load_minkunet_state`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from rayseg.sparse import get_backend, to_points

__all__ = ["ARCHITECTURES", "MinkUNet", "build_minkunet", "load_minkunet_state", "to_points"]

INIT_DIM = 32
# name -> (blocks per stage, channels per stage); stages 1-4 encode, 5-8 decode
ARCHITECTURES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "MinkUNet14A": ((1, 1, 1, 1, 1, 1, 1, 1), (32, 64, 128, 256, 128, 128, 96, 96)),
    "MinkUNet18A": ((2, 2, 2, 2, 2, 2, 2, 2), (32, 64, 128, 256, 128, 128, 96, 96)),
    "MinkUNet18C": ((2, 2, 2, 2, 2, 2, 2, 2), (32, 64, 128, 256, 192, 192, 128, 128)),
    "MinkUNet34C": ((2, 3, 4, 6, 2, 2, 2, 2), (32, 64, 128, 256, 256, 128, 96, 96)),
}


class BasicBlock(nn.Module):
    """Two 3x3x3 convs with BN; a 1x1 conv + BN on the shortcut when the width changes."""

    def __init__(self, sp, in_channels: int, channels: int):
        super().__init__()
        self.conv1 = sp.Conv(in_channels, channels, kernel_size=3)
        self.norm1 = sp.BatchNorm(channels)
        self.conv2 = sp.Conv(channels, channels, kernel_size=3)
        self.norm2 = sp.BatchNorm(channels)
        self.relu = sp.ReLU()
        self.downsample = None
        if in_channels != channels:
            self.downsample = nn.Sequential(sp.Conv(in_channels, channels, kernel_size=1), sp.BatchNorm(channels))

    def forward(self, x):
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)  # in place: BN keeps no output
        return self.relu(out)


def _stage(sp, in_channels: int, channels: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*[BasicBlock(sp, in_channels if i == 0 else channels, channels) for i in range(blocks)])


class MinkUNet(nn.Module):
    """forward(coord (M, 4) int [batch, x, y, z], feat (M, Cin)) -> (features (M, D), logits (M, C)).

    `features` is the last decoder block's output (D = `feature_dim`), `logits` the final 1x1
    conv; both have the rows of the input voxels. Map them to points with `to_points(values,
    inverse)`.
    """

    def __init__(self, name: str, in_channels: int, num_classes: int, backend: str = "torch"):
        super().__init__()
        if name not in ARCHITECTURES:
            raise ValueError(f"unknown MinkUNet variant {name!r}; available: {', '.join(ARCHITECTURES)}")
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        sp = get_backend(backend)
        self.name, self.backend = name, backend
        self.in_channels, self.num_classes = in_channels, num_classes
        layers, planes = ARCHITECTURES[name]
        self.feature_dim = planes[7]

        self.conv0p1s1 = sp.Conv(in_channels, INIT_DIM, kernel_size=5)
        self.bn0 = sp.BatchNorm(INIT_DIM)
        # encoder: stride 1 -> 2 -> 4 -> 8 -> 16
        width = INIT_DIM
        self.conv1p1s2, self.bn1 = sp.Conv(width, width, 2, stride=2), sp.BatchNorm(width)
        self.block1 = _stage(sp, width, planes[0], layers[0])
        width = planes[0]
        self.conv2p2s2, self.bn2 = sp.Conv(width, width, 2, stride=2), sp.BatchNorm(width)
        self.block2 = _stage(sp, width, planes[1], layers[1])
        width = planes[1]
        self.conv3p4s2, self.bn3 = sp.Conv(width, width, 2, stride=2), sp.BatchNorm(width)
        self.block3 = _stage(sp, width, planes[2], layers[2])
        width = planes[2]
        self.conv4p8s2, self.bn4 = sp.Conv(width, width, 2, stride=2), sp.BatchNorm(width)
        self.block4 = _stage(sp, width, planes[3], layers[3])
        width = planes[3]
        # decoder: stride 16 -> 8 -> 4 -> 2 -> 1, concatenating the encoder output of each stride
        self.convtr4p16s2, self.bntr4 = sp.ConvTranspose(width, planes[4]), sp.BatchNorm(planes[4])
        self.block5 = _stage(sp, planes[4] + planes[2], planes[4], layers[4])
        self.convtr5p8s2, self.bntr5 = sp.ConvTranspose(planes[4], planes[5]), sp.BatchNorm(planes[5])
        self.block6 = _stage(sp, planes[5] + planes[1], planes[5], layers[5])
        self.convtr6p4s2, self.bntr6 = sp.ConvTranspose(planes[5], planes[6]), sp.BatchNorm(planes[6])
        self.block7 = _stage(sp, planes[6] + planes[0], planes[6], layers[6])
        self.convtr7p2s2, self.bntr7 = sp.ConvTranspose(planes[6], planes[7]), sp.BatchNorm(planes[7])
        self.block8 = _stage(sp, planes[7] + INIT_DIM, planes[7], layers[7])
        self.final = sp.Conv(planes[7], num_classes, kernel_size=1, bias=True)
        self.relu = sp.ReLU()
        self._init_weights()

    @property
    def sparse(self):
        """The sparse backend module (looked up by name: the model pickles without it)."""
        return get_backend(self.backend)

    def _init_weights(self) -> None:
        # MinkowskiEngine's MinkUNet init: kaiming normal (fan out, ReLU) for the convolutions,
        # BN weight 1 / bias 0; transposed convs keep the backend's default.
        for m in self.modules():
            if isinstance(m, self.sparse.Conv):
                kernel = m.kernel  # ME's fan out: volume * out, but dim 0 (= in) for 1x1 kernels
                fan_out = kernel.shape[0] if kernel.dim() == 2 else kernel.shape[0] * kernel.shape[2]
                std = (2.0 / fan_out) ** 0.5
                with torch.no_grad():
                    kernel.normal_(0.0, std)
            elif isinstance(m, self.sparse.BatchNorm):
                nn.init.ones_(m.bn.weight)
                nn.init.zeros_(m.bn.bias)

    @property
    def sparse(self):
        """The backend module (looked up, not stored, so the model deep-copies and pickles)."""
        return get_backend(self.backend)

    def forward(self, coord: torch.Tensor, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sp = self.sparse
        x = sp.make_input(coord, feat, self.in_channels)
        out_p1 = self.relu(self.bn0(self.conv0p1s1(x)))
        out_b1p2 = self.block1(self.relu(self.bn1(self.conv1p1s2(out_p1))))
        out_b2p4 = self.block2(self.relu(self.bn2(self.conv2p2s2(out_b1p2))))
        out_b3p8 = self.block3(self.relu(self.bn3(self.conv3p4s2(out_b2p4))))
        out = self.block4(self.relu(self.bn4(self.conv4p8s2(out_b3p8))))
        out = self.relu(self.bntr4(self.convtr4p16s2(out)))
        out = self.block5(sp.cat(out, out_b3p8))
        out = self.relu(self.bntr5(self.convtr5p8s2(out)))
        out = self.block6(sp.cat(out, out_b2p4))
        out = self.relu(self.bntr6(self.convtr6p4s2(out)))
        out = self.block7(sp.cat(out, out_b1p2))
        out = self.relu(self.bntr7(self.convtr7p2s2(out)))
        out = self.block8(sp.cat(out, out_p1))
        logits = self.final(out)
        return sp.features(out), sp.features(logits)


def build_minkunet(name: str, in_channels: int, num_classes: int, backend: str = "torch") -> MinkUNet:
    """A MinkUNet variant ('MinkUNet14A', '18A', '18C', '34C') on sparse backend 'torch' or 'minkowski'."""
    return MinkUNet(name, in_channels, num_classes, backend)


def load_minkunet_state(model: MinkUNet, state: Mapping[str, torch.Tensor] | str, source: str = "state dict") -> None:
    """Load a MinkUNet state dict from either backend (or a path to one) into `model`.

    Both backends share parameter names, shapes and kernel offset order, so no tensor is
    permuted. Accepted wrappers: a checkpoint dict with 'state_dict' / 'model', and a 'module.'
    (DistributedDataParallel) prefix. Every missing, unexpected or mis-shaped parameter is named
    in the error.
    """
    if isinstance(state, str):
        source = state
        state = torch.load(state, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if missing:
        problems.append(f"missing: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
    if problems:
        raise ValueError(f"{source} does not fit {model.name} (in {model.in_channels}, "
                         f"{model.num_classes} classes): " + " | ".join(problems))
    model.load_state_dict({k: v.to(own[k].device) for k, v in state.items()})
