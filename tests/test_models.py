"""Every architecture maps images to unit 128-d features, on CPU."""

from __future__ import annotations

import pytest
import torch

from oocid.models import ARCHS, build_model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels", [1, 3])
def test_unit_features(arch: str, channels: int) -> None:
    size = 32 if arch in ("small", "cifar_resnet18") else 64
    model = build_model(arch, channels, 128).eval()
    with torch.no_grad():
        f = model(torch.randn(2, channels, size, size))
    assert f.shape == (2, 128)
    assert torch.allclose(f.norm(dim=1), torch.ones(2), atol=1e-5)


def test_unknown_arch() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg", 3)


def test_resnet_keeps_torchvision_names() -> None:
    import torchvision

    ours = build_model("resnet18", 3, 128).backbone.state_dict()
    ref = torchvision.models.resnet18(weights=None).state_dict()
    assert set(ours) == set(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref if not k.startswith("fc."))
