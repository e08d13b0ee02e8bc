"""Backbones with the NPID head: backbone -> fc to D (128) -> L2 norm.

One factory, `build_model`; every model maps (B, C, H, W) images to (B, D) unit features.
Architectures:
    small       a narrow conv net for tiny images (16-32-64-128, BN, ReLU, 2x2 max-pool after
                the first three blocks, global average pool; docs/method.md, "Notes from
                experiments")
    resnet18    torchvision ResNet-18 (ImageNet stem)
    resnet50    torchvision ResNet-50 (ImageNet stem)
    cifar_resnet18  ResNet-18 with a 3x3 stride-1 stem and no max-pool (the official CIFAR net)
The torchvision backbones keep torchvision's parameter names, so `backbone` exports load
strictly into torchvision's model (the fc layer aside).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHS = ("small", "resnet18", "resnet50", "cifar_resnet18")


class Float32Linear(nn.Linear):
    """nn.Linear computed in float32 whatever autocast says: the head's output is L2-normalised
    and compared against bank rows at temperature 0.07, so rounding it to bf16 (8 bits of
    mantissa) first would cost the scores their precision. Same parameters and names as
    nn.Linear; identical to it outside autocast."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight, self.bias)


def _float32_head(fc: nn.Module) -> nn.Module:
    """The backbone's fc layer made a Float32Linear in place (no new parameters drawn, so the
    initialisation and the RNG stream are untouched)."""
    if type(fc) is nn.Linear:
        fc.__class__ = Float32Linear
    return fc


class SmallConvNet(nn.Module):
    """conv3x3-BN-ReLU blocks of the given widths; 2x2 max-pool after all but the last;
    global average pool; `fc` to `out_dim`."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64, 128),
                 out_dim: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = Float32Linear(c, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x).mean(dim=(2, 3))  # (B, C)
        return cast(Tensor, self.fc(h))


def _torchvision_resnet(arch: str, in_channels: int, out_dim: int) -> nn.Module:
    import torchvision  # lazily: importing it slows the start of every command

    if arch in ("resnet18", "cifar_resnet18"):
        net = torchvision.models.resnet18(weights=None, num_classes=out_dim)
    elif arch == "resnet50":
        net = torchvision.models.resnet50(weights=None, num_classes=out_dim)
    else:  # pragma: no cover - guarded by build_model
        raise ValueError(arch)
    if arch == "cifar_resnet18":
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    _float32_head(net.fc)
    return cast(nn.Module, net)


class Embedder(nn.Module):
    """backbone (ending in fc -> out_dim) followed by L2 normalisation: (B,C,H,W) -> (B,D)."""

    def __init__(self, arch: str, backbone: nn.Module, in_channels: int, out_dim: int) -> None:
        super().__init__()
        self.arch = arch
        self.in_channels = in_channels
        self.out_dim = out_dim
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        # the backbone's fc is a Float32Linear: its output, and so the norm, are float32
        return F.normalize(self.backbone(x).float(), dim=1)


def build_model(arch: str, in_channels: int = 3, out_dim: int = 128) -> Embedder:
    """The model for `arch` (one of ARCHS) with an fc head to `out_dim` and L2 norm."""
    if arch == "small":
        backbone: nn.Module = SmallConvNet(in_channels, out_dim=out_dim)
    elif arch in ("resnet18", "resnet50", "cifar_resnet18"):
        backbone = _torchvision_resnet(arch, in_channels, out_dim)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return Embedder(arch, backbone, in_channels, out_dim)


@torch.no_grad()
def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
