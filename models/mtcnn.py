"""MTCNN's three face-detection nets (P-, R-, O-Net), laid out like facenet-pytorch 2.6.0.

Attribute names and shapes follow the state dicts shipped in that wheel
(`facenet_pytorch/data/{pnet,rnet,onet}.pt`) so `load_state_dict(strict=True)` works;
the forward passes return the heads in facenet-pytorch's order (box regression first,
face probability last). The package itself is not importable here (it needs
torchvision), hence this local definition. Used by `models.corpus`.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn


def _flatten_whc(x: Tensor) -> Tensor:
    # The weights come from a Caffe/TF model that flattened feature maps as (W, H, C);
    # the dense layers only match that order.
    return torch.flatten(x.permute(0, 3, 2, 1), 1)


class PNet(nn.Module):
    """Proposal net: fully convolutional (12x12 receptive field, stride 2).

    Returns (bbox [N,4,h,w], prob [N,2,h,w]) with prob softmaxed over channels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)  # face / not-face
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)  # box regression

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class RNet(nn.Module):
    """Refinement net on 24x24 crops. Returns (bbox [N,4], prob [N,2])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(64 * 3 * 3, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_whc(x)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    """Output net on 48x48 crops. Returns (bbox [N,4], landmarks [N,10], prob [N,2])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(128 * 3 * 3, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_whc(x)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


NETS: dict[str, type[nn.Module]] = {"pnet": PNet, "rnet": RNet, "onet": ONet}
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "pnet": ("bbox", "prob"),
    "rnet": ("bbox", "prob"),
    "onet": ("bbox", "landmarks", "prob"),
}


def load(net: str, state_dict_path: str | os.PathLike) -> nn.Module:
    """Build `net` ("pnet", "rnet" or "onet"), load its state dict strictly, return it in eval mode."""
    model = NETS[net]()
    state = torch.load(os.fspath(state_dict_path), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
