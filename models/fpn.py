"""A small FPN detector: a backbone, a feature pyramid and a conv tower with a 1x1 output per level.

Its graph has several conv chains, not one: the longest path runs through the backbone into the finest
level's tower, and every other level's tower is a chain of its own (smoothing 3x3, two 3x3 + ReLU, 1x1
output), which is what ``compress`` finds and merges beyond the longest path (multi-chain LayerMerge).
Laterals are 1x1 convs; the top-down pathway upsamples (nearest) and adds, as in Lin et al. (2017).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FPN(nn.Module):
    """Input height/width must be divisible by 2 ** len(widths) (16 by default). Returns one map per level,
    finest first, each with ``outputs`` channels."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64), pyramid: int = 32,
                 outputs: int = 8):
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, widths[0], stride=2)
        stages, cin = [], widths[0]
        for w in widths:
            stages.append(nn.Sequential(_conv_bn_relu(cin, w, stride=2), _conv_bn_relu(w, w)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.lateral = nn.ModuleList(nn.Conv2d(w, pyramid, 1) for w in widths)
        self.smooth = nn.ModuleList(nn.Conv2d(pyramid, pyramid, 3, padding=1) for _ in widths)
        self.towers = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(pyramid, pyramid), _conv_bn_relu(pyramid, pyramid),
                          nn.Conv2d(pyramid, outputs, 1))
            for _ in widths)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        levels = [self.lateral[-1](features[-1])]
        for lateral, feature in zip(reversed(self.lateral[:-1]), reversed(features[:-1])):
            levels.insert(0, lateral(feature) + F.interpolate(levels[0], scale_factor=2.0, mode="nearest"))
        return tuple(tower(smooth(level)) for tower, smooth, level in zip(self.towers, self.smooth, levels))
