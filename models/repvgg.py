"""RepVGG in its *training* form (Ding et al., 2021): every block sums a 3x3 conv+BN,
a 1x1 conv+BN and, when shapes allow, an identity BN. Exported as-is, these are
the multi-branch Add patterns that structural re-parameterisation must collapse
into a single 3x3 conv."""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.rbr_dense = _conv_bn(cin, cout, 3, stride)
        self.rbr_1x1 = _conv_bn(cin, cout, 1, stride)
        self.rbr_identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.relu(out)


class RepVGG(nn.Module):
    """Defaults are RepVGG-A0 (a=0.75, b=2.5): stem 48, stages (2, 4, 14, 1) blocks of
    widths (48, 96, 192, 1280); the stem and each stage's first block have stride 2."""

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (2, 4, 14, 1),
        widths: tuple[int, ...] = (48, 96, 192, 1280),
        stem_width: int = 48,
        num_classes: int = 1000,
        in_channels: int = 3,
    ):
        super().__init__()
        blocks: list[nn.Module] = [RepVGGBlock(in_channels, stem_width, 2)]
        cin = stem_width
        for n, w in zip(num_blocks, widths, strict=True):
            for i in range(n):
                blocks.append(RepVGGBlock(cin, w, 2 if i == 0 else 1))
                cin = w
        self.features = nn.Sequential(*blocks)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.gap(self.features(x)), 1))


def repvgg_a0(**kw) -> RepVGG:
    return RepVGG(**kw)


def repvgg_tiny(**kw) -> RepVGG:
    """Small enough (~0.4 MB ONNX) to ship as the README example; has 4 identity blocks."""
    kw.setdefault("num_classes", 10)
    return RepVGG(num_blocks=(2, 3, 2), widths=(16, 32, 64), stem_width=16, **kw)
