"""Device and precision resolution, checked on the CPU with torch.cuda's queries faked."""

from __future__ import annotations

import pytest
import torch

from oocid.device import resolve_precision


@pytest.mark.parametrize(("native", "want"), [(True, "bf16"), (False, "16")])
def test_auto_precision_ignores_emulated_bf16(monkeypatch: pytest.MonkeyPatch, native: bool,
                                              want: str) -> None:
    # a V100 or T4 reports bf16 "supported" by emulation only; auto must pick fp16 there
    def fake(including_emulation: bool = True) -> bool:
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake)
    cuda = torch.device("cuda:0")
    assert resolve_precision("auto", cuda) == want
    assert resolve_precision("32", cuda) == "32"
    assert resolve_precision("auto", torch.device("cpu")) == "32"
