"""A stand-in `torchvision` with only `models.resnet34/50/101(weights=None, ...)`, for machines
without torchvision (the GPU check's). Same module and parameter names and the same layer layout
as torchvision's ResNets, so rayseg.models.resnet2d builds on it unchanged; random init only
(kaiming normal convs, BN weight 1 / bias 0). `install()` registers it only when the real import
fails."""

from __future__ import annotations

import sys
import types

from torch import nn


def _conv3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1, self.bn1 = _conv3(cin, width, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3(width, width), nn.BatchNorm2d(width)
        self.relu, self.downsample, self.stride = nn.ReLU(inplace=True), downsample, stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3(width, width, stride, dilation), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4)
        self.relu, self.downsample, self.stride = nn.ReLU(inplace=True), downsample, stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, block, layers, replace_stride_with_dilation=None, num_classes=1000):
        super().__init__()
        dilate = replace_stride_with_dilation or [False, False, False]
        self.cin, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(block, 64, layers[0])
        self.layer2 = self._layer(block, 128, layers[1], 2, dilate[0])
        self.layer3 = self._layer(block, 256, layers[2], 2, dilate[1])
        self.layer4 = self._layer(block, 512, layers[3], 2, dilate[2])
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _layer(self, block, width, blocks, stride=1, dilate=False):
        previous = self.dilation
        if dilate:  # the stride becomes dilation (output stride kept)
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.cin != width * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.cin, width * block.expansion, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(width * block.expansion))
        layers = [block(self.cin, width, stride, downsample, previous)]
        self.cin = width * block.expansion
        layers += [block(self.cin, width, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet34(weights=None, **kw):
    return ResNet(BasicBlock, [3, 4, 6, 3], **kw)


def resnet50(weights=None, **kw):
    return ResNet(Bottleneck, [3, 4, 6, 3], **kw)


def resnet101(weights=None, **kw):
    return ResNet(Bottleneck, [3, 4, 23, 3], **kw)


def install() -> str:
    """'torchvision <version>' if the real one imports, else registers this stand-in."""
    from rayseg.models._torchvision import import_torchvision

    try:
        return f"torchvision {import_torchvision().__version__}"
    except ImportError:
        pass
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.resnet34, models.resnet50, models.resnet101 = resnet34, resnet50, resnet101
    tv.models, tv.__version__ = models, "stand-in (benchmarks/_tv_fallback.py)"
    sys.modules["torchvision"], sys.modules["torchvision.models"] = tv, models
    return f"torchvision {tv.__version__}"
