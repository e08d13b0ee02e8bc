"""The momentum update of the memory bank (docs/method.md, "The memory update")."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oocid.method.npid import momentum_update, random_unit_rows


def test_momentum_update_hand_computed() -> None:
    old = torch.tensor([[1.0, 0.0]])
    new = torch.tensor([[0.0, 1.0]])
    got = momentum_update(old, new, 0.5)
    assert torch.allclose(got, torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)]]))
    got = momentum_update(old, new, 0.75)  # weight on the OLD row
    v = torch.tensor([0.75, 0.25])
    assert torch.allclose(got[0], v / v.norm())


def test_momentum_update_matches_official_code() -> None:
    g = torch.Generator().manual_seed(0)
    old = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    x = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    # lemniscate NCEFunction.backward
    weight_pos = old.clone()
    weight_pos.mul_(0.5)
    weight_pos.add_(torch.mul(x.data, 1 - 0.5))
    w_norm = weight_pos.pow(2).sum(1, keepdim=True).pow(0.5)
    ref = weight_pos.div(w_norm)
    assert torch.equal(momentum_update(old, x, 0.5), ref)


def test_momentum_zero_takes_new_row() -> None:
    new = random_unit_rows(5, 7, torch.Generator().manual_seed(1))
    old = random_unit_rows(5, 7, torch.Generator().manual_seed(2))
    assert torch.allclose(momentum_update(old, new, 0.0), new, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.integers(1, 32), st.floats(0.0, 0.99), st.integers(0, 10**6))
def test_momentum_update_rows_are_unit(b: int, d: int, m: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    old, new = random_unit_rows(b, d, g), random_unit_rows(b, d, g)
    out = momentum_update(old, new, m)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=1), torch.ones(b), atol=1e-5)


def test_random_unit_rows() -> None:
    r = random_unit_rows(100, 128, torch.Generator().manual_seed(0))
    assert r.shape == (100, 128)
    assert torch.allclose(r.norm(dim=1), torch.ones(100), atol=1e-5)
    with pytest.raises(RuntimeError):
        random_unit_rows(-1, 2)
