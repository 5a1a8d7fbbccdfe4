"""A small UNet: the skip connections give Concat nodes and the decoder's upsampling
gives Resize nodes, so passes are exercised on a non-chain, multi-consumer graph."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Input height/width must be divisible by 2**len(widths[:-1]) (8 by default)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_double_conv(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(_double_conv(cin + w, w))
            cin = w
        self.head = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)
