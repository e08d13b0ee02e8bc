"""`oocid export`: a checkpoint's backbone as a plain state dict for other code.

The file is `torch.save(state_dict)` (load it with `torch.load(path, weights_only=True)`) and
loads with `strict=True` into the model built by this recipe (B = batch, F = feature width):

    resnet18 / resnet50   m = torchvision.models.resnet18()  (resnet50())
                          m.fc = torch.nn.Identity()                     -> (B, 512) / (B, 2048)
                          for a 1-channel checkpoint also
                          m.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    cifar_resnet18        m = torchvision.models.resnet18()
                          m.conv1 = torch.nn.Conv2d(C, 64, 3, 1, 1, bias=False)
                          m.maxpool = torch.nn.Identity(); m.fc = torch.nn.Identity()  -> (B, 512)
    small                 m = oocid.models.SmallConvNet(C); m.fc = torch.nn.Identity() -> (B, 128)

Keys: every parameter and buffer of the backbone (conv1, bn1, layer1-4 with BN running
statistics and num_batches_tracked; `features.*` for small) and none of the `fc.*` projection
head, so the model outputs the pooled pre-fc features (the paper's conv5 / linear-eval
features). With `head=True` the `fc.*` keys are kept and the file loads into the same
recipe minus the `fc = Identity()` line, built with num_classes=D (SmallConvNet(C, out_dim=D)):
the un-normalised D-dim embedding (the bank's features are its L2 normalisation).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from oocid.checkpoint import atomic_torch_save, load_checkpoint, model_from_checkpoint
from oocid.errors import DataError, InputError
from oocid.models import ARCHS, Embedder, SmallConvNet


@dataclass(frozen=True)
class ExportInfo:
    arch: str
    in_channels: int
    feature_dim: int  # F: width of what the exported model outputs
    head: bool
    n_tensors: int
    n_params: int


def pre_fc(model: Embedder) -> nn.Module:
    """A copy of the backbone whose fc is Identity: (B, C, H, W) -> (B, F) pooled features."""
    net = copy.deepcopy(model.backbone)
    net.fc = nn.Identity()
    return net.eval()


def feature_dim(model: Embedder, head: bool = False) -> int:
    fc = model.backbone.fc
    if not isinstance(fc, nn.Linear):  # pragma: no cover - every arch ends in a Linear fc
        raise DataError(f"{model.arch}: backbone has no Linear fc")
    return fc.out_features if head else fc.in_features


def backbone_state_dict(model: Embedder, head: bool = False) -> dict[str, Tensor]:
    """The backbone's tensors (CPU, contiguous), without `fc.*` unless `head`."""
    sd = model.backbone.state_dict()
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()
            if head or not k.startswith("fc.")}


def reference_model(arch: str, in_channels: int, head_dim: int | None = None) -> nn.Module:
    """The model the export loads into, built by the recipe in this module's docstring
    (`head_dim`: keep an fc to that width, for a `head=True` export)."""
    if arch == "small":
        net: nn.Module = SmallConvNet(in_channels, out_dim=head_dim or 128)
    else:
        import torchvision

        ctor = torchvision.models.resnet50 if arch == "resnet50" else torchvision.models.resnet18
        net = ctor(num_classes=head_dim or 1000)
        if arch == "cifar_resnet18":
            net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    if head_dim is None:
        net.fc = nn.Identity()
    return net


def export_checkpoint(checkpoint: Path, out: Path, *, arch: str | None = None,
                      head: bool = False) -> ExportInfo:
    """Write the backbone of `checkpoint` to `out` (atomically); DataError if its architecture
    is not `arch` (when given)."""
    if arch is not None and arch not in ARCHS:
        raise InputError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if out.suffix not in (".pt", ".pth"):
        raise InputError(f"{out}: the export is a torch file; name it *.pt or *.pth")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such directory")
    state = load_checkpoint(checkpoint)
    if arch is not None and state.get("arch") != arch:
        raise DataError(f"{checkpoint}: is a {state.get('arch')!r} checkpoint, not {arch!r}")
    model = model_from_checkpoint(state, torch.device("cpu"), str(checkpoint))
    sd = backbone_state_dict(model, head)
    with torch.device("meta"):  # self-check of the documented recipe: keys and shapes only
        ref = reference_model(model.arch, model.in_channels, model.out_dim if head else None)
    ref.load_state_dict(sd, strict=True, assign=True)
    atomic_torch_save(sd, out)
    return ExportInfo(model.arch, model.in_channels, feature_dim(model, head), head, len(sd),
                      sum(v.numel() for v in sd.values()))


def load_recipe(info: ExportInfo) -> str:
    """How to load the export, as one line of Python."""
    c = info.in_channels
    if info.arch == "small":
        build = f"m = oocid.models.SmallConvNet({c}" + (f", out_dim={info.feature_dim})" if info.head
                                                      else ")")
    else:
        tv = "resnet50" if info.arch == "resnet50" else "resnet18"
        build = f"m = torchvision.models.{tv}(" + (f"num_classes={info.feature_dim})" if info.head
                                                   else ")")
        if info.arch == "cifar_resnet18":
            build += (f"; m.conv1 = nn.Conv2d({c}, 64, 3, 1, 1, bias=False)"
                      "; m.maxpool = nn.Identity()")
        elif c != 3:
            build += f"; m.conv1 = nn.Conv2d({c}, 64, 7, 2, 3, bias=False)"
    if not info.head:
        build += "; m.fc = nn.Identity()"
    return build + "; m.load_state_dict(torch.load(PATH, weights_only=True), strict=True)"
