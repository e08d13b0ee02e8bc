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


def test_head_is_float32_under_bf16_autocast() -> None:
    """The fc head runs in float32 under autocast: the unit features match a float64 norm of
    the float32 head to float32 rounding (a bf16 head is off by ~1e-2). Outside autocast
    the model is what it was (the head is an nn.Linear with the same parameters)."""
    from oocid.models import Float32Linear

    torch.manual_seed(0)
    m = build_model("small", 1, 128).eval()
    assert isinstance(m.backbone.fc, Float32Linear)
    assert isinstance(build_model("resnet18", 3, 16).backbone.fc, Float32Linear)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f = m(x)
            h = m.backbone.features(x).mean(dim=(2, 3))  # bf16 trunk, as in the forward
        head = torch.nn.functional.linear(h.double(), m.backbone.fc.weight.double(),
                                          m.backbone.fc.bias.double())
        ref = torch.nn.functional.normalize(head, dim=1)
        plain = m(x)
        want = torch.nn.functional.normalize(torch.nn.Linear.forward(
            m.backbone.fc, m.backbone.features(x).mean(dim=(2, 3))), dim=1)
    assert f.dtype == torch.float32
    torch.testing.assert_close(f.double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(plain, want)
