"""MobileNetV2 following torchvision: same channel rounding, ReLU6, linear bottlenecks.

The rounding rule is copied exactly so that width-multiplied variants (1.4) get the
channel counts real exported checkpoints have.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# (expand ratio t, output channels c, repeats n, first stride s) — torchvision's table.
IMAGENET_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`: round to a multiple of `divisor`, never dropping >10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_relu6(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                   act: Callable[[int], nn.Module] | None = None) -> nn.Sequential:
    """``act(channels)`` replaces the ReLU6 when given."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True) if act is None else act(cout),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int,
                 act: Callable[[int], nn.Module] | None = None):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(cin, hidden, k=1, act=act))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden, act=act),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """`setting`, `stem_stride`, `input_channel` and `last_channel` exist so the same
    code can build the tiny digits variant; the defaults are torchvision's."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        setting: list[tuple[int, int, int, int]] = IMAGENET_SETTING,
        in_channels: int = 3,
        input_channel: int = 32,
        last_channel: int = 1280,
        stem_stride: int = 2,
        dropout: float = 0.2,
        act: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        cin = make_divisible(input_channel * width_mult)
        self.last_channel = make_divisible(last_channel * max(1.0, width_mult))
        features: list[nn.Module] = [_conv_bn_relu6(in_channels, cin, stride=stem_stride, act=act)]
        for t, c, n, s in setting:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, act=act))
                cin = cout
        features.append(_conv_bn_relu6(cin, self.last_channel, k=1, act=act))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(width_mult: float = 1.0, **kw) -> MobileNetV2:
    return MobileNetV2(width_mult=width_mult, **kw)
