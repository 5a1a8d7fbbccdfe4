"""VGG-11 (config "A") with BatchNorm: long plain Conv→BN→ReLU chains and max-pools,
no residuals — the simplest case for folding and for depth-merging passes."""
from __future__ import annotations

import torch
from torch import nn

VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG(nn.Module):
    """The classifier is global-pool + two Linears instead of torchvision's 25088x4096
    head, which would dominate file size and export time without adding any new op."""

    def __init__(self, cfg: list = VGG11, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            cout = max(1, int(v * width))
            layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(cin, 512), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(512, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
