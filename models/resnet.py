"""ResNet-18/34/50 laid out like torchvision (v1.5: Bottleneck strides on the 3x3).

Keeping torchvision's layer order matters because the passes are meant to match
the graph shapes real exported ResNets produce (Conv→BN→ReLU chains, residual Adds,
1x1 stride-2 downsample convs).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# ``act(channels)`` builds the activation module applied to a map of that many channels (PReLU needs the
# count); None keeps torchvision's ReLU.
ActFactory = Callable[[int], nn.Module]


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]


def _projection(cin: int, cout: int, stride: int) -> nn.Module | None:
    """torchvision's shortcut: a strided 1x1 conv + BN where the block changes shape, else identity."""
    return nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, act: ActFactory | None = None):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, width, 3, stride)
        self.conv2, self.bn2 = _conv_bn(width, cout, 3)
        self.relu = nn.ReLU(inplace=True) if act is None else act(width)
        self.act_out = None if act is None else act(cout)  # a second module: a PReLU has its own slope
        self.downsample = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return (self.relu if self.act_out is None else self.act_out)(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, act: ActFactory | None = None):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, cout, 1)
        self.relu = nn.ReLU(inplace=True)
        # With ``act``, one module per use (a PReLU has its own slope); None keeps the shared ReLU.
        self.acts = None if act is None else nn.ModuleList([act(width), act(width), act(cout)])
        self.downsample = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        first, second, last = (self.relu,) * 3 if self.acts is None else tuple(self.acts)
        out = first(self.bn1(self.conv1(x)))
        out = second(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return last(out + identity)


class ResNet(nn.Module):
    """`small_stem` swaps the 7x7/2 conv + max-pool for one 3x3/1 conv so tiny
    inputs (8x8 digits upsampled) keep enough resolution for the later stages."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        width: int = 64,
        in_channels: int = 3,
        small_stem: bool = False,
        act: ActFactory | None = None,
    ):
        super().__init__()
        if small_stem:
            stem = [*_conv_bn(in_channels, width, 3), nn.ReLU(inplace=True) if act is None else act(width)]
        else:
            stem = [
                nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True) if act is None else act(width),
                nn.MaxPool2d(3, 2, 1),
            ]
        self.stem = nn.Sequential(*stem)
        stages, cin = [], width
        for i, n in enumerate(layers):
            w = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, w, 2 if i > 0 and j == 0 else 1, act=act))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(**kw) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kw)


def resnet34(**kw) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kw)


def resnet50(**kw) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kw)
