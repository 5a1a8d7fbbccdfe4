"""Name → constructor registry shared by the export CLI, the digits trainer and tests."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from .fpn import FPN
from .mobilenet import MobileNetV2, mobilenet_v2
from .repvgg import repvgg_a0, repvgg_tiny
from .resnet import BasicBlock, ResNet, resnet18, resnet34, resnet50
from .unet import UNet
from .vgg import VGG

# 8x8 digits are upsampled to 16x16 single-channel images (see models.digits).
DIGITS_SHAPE = (1, 1, 16, 16)


def digits_resnet(**kw) -> ResNet:
    kw = {"num_classes": 10, "width": 16, "in_channels": 1, "small_stem": True, **kw}
    return ResNet(BasicBlock, [1, 1, 1], **kw)


def digits_mobilenet(**kw) -> MobileNetV2:
    kw = {
        "num_classes": 10,
        "in_channels": 1,
        "input_channel": 16,
        "last_channel": 128,
        "stem_stride": 1,
        "dropout": 0.0,
        "setting": [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 1, 1)],
        **kw,
    }
    return MobileNetV2(**kw)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v2_1.4": partial(mobilenet_v2, width_mult=1.4),
    "vgg": VGG,
    "repvgg": repvgg_a0,
    "repvgg_tiny": repvgg_tiny,
    "unet": UNet,
    "fpn": FPN,
    "digits_resnet": digits_resnet,
    "digits_mobilenet": digits_mobilenet,
}

INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    **{name: (1, 3, 224, 224) for name in MODELS},
    "repvgg_tiny": (1, 3, 32, 32),
    "unet": (1, 3, 64, 64),
    "fpn": (1, 3, 64, 64),
    "digits_resnet": DIGITS_SHAPE,
    "digits_mobilenet": DIGITS_SHAPE,
}


def _lookup(name: str) -> Callable[..., nn.Module]:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}") from None


def default_input_shape(name: str) -> tuple[int, ...]:
    _lookup(name)
    return INPUT_SHAPES[name]


def randomize_bn(model: nn.Module, seed: int = 0, calib_input: torch.Tensor | None = None) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine params.

    With the default init (mean 0, var 1, gamma 1, beta 0) BN is almost the identity,
    so a broken fold would still match the reference output. Purely random stats are
    not enough either: in deep nets they let activations vanish until the output no
    longer depends on the input. So, given `calib_input`, the running stats are first
    measured on it (as training would) and then jittered.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            c = m.num_features
            m.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=g))
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
        if calib_input is not None:
            was_training = model.training
            momenta = [m.momentum for m in bns]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch sets the stats exactly
            model.train()(calib_input)
            for m, mom in zip(bns, momenta):
                m.momentum = mom
            model.train(was_training)
        for m in bns:
            c = m.num_features
            std = m.running_var.sqrt()
            m.running_mean.add_(torch.randn(c, generator=g) * 0.2 * std)
            m.running_var.mul_(torch.empty(c).uniform_(0.5, 2.0, generator=g))
    return model


def build(name: str, seed: int = 0, **kw) -> nn.Module:
    """Construct `name` with seeded weights and data-calibrated, randomized BN, in eval mode.

    Calibration runs at the default input shape with batch 4 and the spatial size
    capped at 64 so that building ImageNet-sized models stays cheap.
    """
    ctor = _lookup(name)
    torch.manual_seed(seed)
    model = ctor(**kw)
    _, c, h, w = INPUT_SHAPES[name]
    if "in_channels" in kw:
        c = kw["in_channels"]
    x = torch.randn(4, c, min(h, 64), min(w, 64), generator=torch.Generator().manual_seed(seed))
    return randomize_bn(model, seed, x).eval()
