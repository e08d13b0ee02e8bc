"""The losses against hand-computed values and against the official code's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oocid.method.fast import shared_scores
from oocid.method.npid import infonce_loss, nce_criterion, nce_loss, nce_probs, softmax_loss
from oocid.method.zest import ZEstimator


def official_nce(x: torch.Tensor, weight: torch.Tensor, n_lem: int, t: float, z: float
                 ) -> tuple[torch.Tensor, float]:
    """lemniscate.pytorch NCEFunction.forward + NCECriterion.forward, transcribed with their
    in-place ops (z < 0 means: estimate it from this batch)."""
    batch_size, input_size = x.shape
    out = torch.bmm(weight, x.reshape(batch_size, input_size, 1))
    out.div_(t).exp_()
    if z < 0:
        z = out.mean().item() * n_lem
    out.div_(z).resize_(batch_size, weight.shape[1])
    eps = 1e-7
    k = out.size(1) - 1
    pnt = 1 / float(n_lem)
    pns = 1 / float(n_lem)
    pmt = out.select(1, 0)
    pmt_div = pmt.add(k * pnt + eps)
    ln_pmt = torch.div(pmt, pmt_div)
    pon_div = out.narrow(1, 1, k).add(k * pns + eps)
    pon = pon_div.clone().fill_(k * pns)
    ln_pon = torch.div(pon, pon_div)
    ln_pmt.log_()
    ln_pon.log_()
    loss = -(ln_pmt.sum(0) + ln_pon.view(-1, 1).sum(0)) / batch_size
    return loss.squeeze(), z


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).float()


def test_nce_hand_computed_tiny() -> None:
    # B=1, K=1, D=2: x=(1,0), positive (1,0), negative (0,1); N=4, t=1, z given = 2.
    x = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    loss, z = nce_loss(x, w, n_data=4, temperature=1.0, z=2.0, eps=0.0)
    p0, p1, c = math.e / 2, 1 / 2, 1 / 4
    expected = -(math.log(p0 / (p0 + c)) + math.log(c / (p1 + c)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert z.item() == 2.0


def test_nce_estimates_z_from_all_entries_including_positive() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])
    _, z = nce_loss(x, w, n_data=10, temperature=0.5)
    # scores: [1, 0], [1, 1] -> exp(s/0.5): [e^2, 1], [e^2, e^2]
    assert z.item() == pytest.approx(10 * (3 * math.exp(2) + 1) / 4, rel=1e-6)


@pytest.mark.parametrize("z", [-1.0, 123.0])
def test_nce_matches_official_code(z: float) -> None:
    b, k, d, n = 8, 50, 16, 1000
    x = unit(b, d, seed=1)
    w = unit(b, k + 1, d, seed=2)
    ref_loss, ref_z = official_nce(x.clone(), w.clone(), n, 0.07, z)
    loss, got_z = nce_loss(x, w, n, 0.07, z=None if z < 0 else z)
    assert got_z.item() == pytest.approx(ref_z, rel=1e-6)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)


def nce_float64(x: torch.Tensor, w: torch.Tensor, n: int, t: float, eps: float = 1e-7
                ) -> torch.Tensor:
    """The per-batch NCE loss in float64 from the same inputs, Z estimated from the batch."""
    out = torch.exp(torch.einsum("bkd,bd->bk", w.double(), x) / t)  # (B, K+1)
    p = out / (out.detach().mean() * n)
    c = (w.shape[1] - 1) / n
    return -(torch.log(p[:, 0] / (p[:, 0] + c + eps)).sum()
             + torch.log(c / (p[:, 1:] + c + eps)).sum()) / x.shape[0]


def test_nce_at_the_paper_scale_equals_the_float64_loss() -> None:
    # K 4096 against N = 1.28M: each negative's term is about -1/K, and log(c / (P + c + eps))
    # rounded to float32 near 1 biased every one of them alike (2e-4 of the loss in all)
    b, k, d, n = 8, 4096, 128, 1_281_167
    x = unit(b, d, seed=7)
    w = unit(b, k + 1, d, seed=8)
    w[:, 0] = F.normalize(x + 0.3 * w[:, 0], dim=1)  # positives near their features
    xr = x.double().requires_grad_(True)
    want = nce_float64(xr, w, n, 0.07)
    want.backward()
    xo = x.clone().requires_grad_(True)
    got, _ = nce_loss(xo, w, n, 0.07)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=2e-6)
    assert xo.grad is not None and xr.grad is not None
    torch.testing.assert_close(xo.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)


def test_nce_gradient_flows_to_x_only() -> None:
    x = unit(4, 8, seed=3).requires_grad_(True)
    w = unit(4, 6, 8, seed=4).requires_grad_(True)
    loss, _ = nce_loss(x, w, 100, 0.07)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert w.grad is None


def test_nce_z_is_constant_in_gradient() -> None:
    # d/dx of the loss with Z estimated == d/dx with the same Z passed as a constant
    x1 = unit(4, 8, seed=5).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    w = unit(4, 6, 8, seed=6)
    l1, z = nce_loss(x1, w, 100, 0.07)
    l2, _ = nce_loss(x2, w, 100, 0.07, z=z)
    l1.backward()
    l2.backward()
    assert torch.allclose(x1.grad, x2.grad)  # type: ignore[arg-type]


def test_nce_rejects_no_negatives() -> None:
    with pytest.raises(ValueError):
        nce_loss(unit(2, 4), unit(2, 1, 4), 10, 0.07)


def test_softmax_loss_hand_computed() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0]])
    loss = softmax_loss(x, bank, torch.tensor([0]), temperature=0.5)
    logits = torch.tensor([2.0, 0.0, -2.0])
    expected = -(logits[0] - torch.logsumexp(logits, 0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_softmax_loss_matches_official_linear_average() -> None:
    x, bank = unit(16, 32, seed=7), unit(100, 32, seed=8)
    idx = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(0))
    out = torch.mm(x, bank.t()).div_(0.07)  # official LinearAverage.forward
    ref = torch.nn.CrossEntropyLoss()(out, idx)
    assert softmax_loss(x, bank, idx, 0.07).item() == pytest.approx(ref.item(), rel=1e-6)


def test_infonce_is_cross_entropy_with_target_zero() -> None:
    x, w = unit(4, 8, seed=9), unit(4, 5, 8, seed=10)
    s = torch.einsum("bkd,bd->bk", w, x) / 0.1
    ref = -(s[:, 0] - torch.logsumexp(s, 1)).mean()
    assert infonce_loss(x, w, 0.1).item() == pytest.approx(ref.item(), rel=1e-5)


def test_shared_scores_equal_per_sample_with_repeated_negatives() -> None:
    x, pos, neg = unit(4, 8, seed=11), unit(4, 8, seed=12), unit(6, 8, seed=13)
    w = torch.cat([pos.unsqueeze(1), neg.unsqueeze(0).expand(4, 6, 8)], 1)
    ref = torch.bmm(w, x.unsqueeze(2)).squeeze(2)
    assert torch.allclose(shared_scores(x, pos, neg), ref, atol=1e-6)


@pytest.mark.parametrize("onednn", [True, False])
def test_shared_scores_gradient_through_either_gemm(monkeypatch: pytest.MonkeyPatch, onednn: bool
                                                    ) -> None:
    """The scores and the gradient to x equal plain autograd's, through oneDNN's GEMM (where
    torch has it) or torch.mm; the negatives get no gradient."""
    import oocid.method.kernels as gemm_mod

    if onednn and not gemm_mod.onednn_gemm():
        pytest.skip("this torch build has no usable oneDNN linear; torch.mm is the path")
    monkeypatch.setattr(gemm_mod, "onednn_gemm", lambda: onednn)
    x0, pos, neg = unit(16, 32, seed=21), unit(16, 32, seed=22), unit(300, 32, seed=23)
    up = torch.randn(16, 301, generator=torch.Generator().manual_seed(24))
    x = x0.clone().requires_grad_(True)
    s = shared_scores(x, pos, neg)
    (s * up).sum().backward()
    xr = x0.clone().requires_grad_(True)
    ref = torch.cat([(xr * pos).sum(1, keepdim=True), xr @ neg.t()], 1)
    (ref * up).sum().backward()
    assert torch.allclose(s, ref, atol=1e-6)
    assert x.grad is not None and xr.grad is not None
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 inside, gradient too
        xa = x0.clone().requires_grad_(True)
        sa = shared_scores(xa, pos, neg)
    assert sa.dtype == torch.float32 and torch.allclose(sa, ref, atol=1e-6)
    (sa * up).sum().backward()
    assert xa.grad is not None and torch.allclose(xa.grad, xr.grad, atol=1e-5)


def test_keep_large_buffers_applies_once() -> None:
    import ctypes.util

    from oocid.device import keep_large_buffers

    glibc = ctypes.util.find_library("c") is not None and __import__("platform").libc_ver()[0] == "glibc"
    assert keep_large_buffers() is glibc
    assert keep_large_buffers() is glibc  # cached: mallopt is called once


def test_z_estimator_oneshot_and_ema() -> None:
    s1 = torch.zeros(2, 3)  # exp(0) = 1 -> estimate N
    s2 = torch.full((2, 3), math.log(2.0) * 0.1)  # exp(s/0.1) = 2 -> estimate 2N
    one = ZEstimator("oneshot")
    assert one(s1, 10, 0.1).item() == pytest.approx(10)
    assert one(s2, 10, 0.1).item() == pytest.approx(10)  # fixed after the first batch
    ema = ZEstimator("ema", momentum=0.9)
    assert ema(s1, 10, 0.1).item() == pytest.approx(10)
    assert ema(s2, 10, 0.1).item() == pytest.approx(0.9 * 10 + 0.1 * 20)
    assert ema.drift() == pytest.approx(1.1)
    restored = ZEstimator("ema")
    restored.load_state_dict(ema.state_dict())
    assert restored.value == ema.value and restored.momentum == 0.9


def test_nce_probs_and_criterion_compose_to_nce_loss() -> None:
    x, w = unit(3, 4, seed=14), unit(3, 5, 4, seed=15)
    scores = torch.bmm(w, x.unsqueeze(2)).squeeze(2)
    p, z = nce_probs(scores, 50, 0.07)
    loss, z2 = nce_loss(x, w, 50, 0.07)
    assert z.item() == pytest.approx(z2.item())
    assert nce_criterion(p, 50).item() == pytest.approx(loss.item(), rel=1e-6)


# 50 <= 32 * 13 rows: the dense GEMM; 10,000: gathered, in one block or in blocks of 3 samples
@pytest.mark.parametrize(("rows", "block"), [(50, None), (10_000, None), (10_000, 3)])
def test_negative_scores_either_way_match_the_materialised_gather_and_its_gradient(
        rows: int, block: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    import oocid.method.fast as L

    g = torch.Generator().manual_seed(1)
    table = torch.nn.functional.normalize(torch.randn(rows, 8, generator=g), dim=1)
    pos = torch.randint(0, rows, (7, 13), generator=g)
    pos[:, 1] = pos[:, 0]  # a row drawn twice for the same sample gets both gradients
    x1 = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    w = torch.randn(7, 13, generator=g)
    dense = rows <= L.DENSE_ROWS_PER_NEGATIVE * 13
    calls: list[str] = []
    real = L.gathered_scores
    with monkeypatch.context() as mp:
        mp.setattr(L, "gathered_scores", lambda *a: calls.append("gathered") or real(*a))
        if block is not None:  # blocks of 3 samples: 7 = 3 + 3 + 1, forward and backward
            mp.setattr(L, "GATHER_BLOCK_BYTES", block * 13 * 8 * 4)
        s1 = L.negative_scores(x1, table, pos)
        (s1 * w).sum().backward()
    assert calls == ([] if dense else ["gathered"])
    s2 = torch.bmm(table[pos], x2.unsqueeze(2)).squeeze(2)
    (s2 * w).sum().backward()
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(x1.grad, x2.grad)
    s3 = L.negative_scores(x1, table, pos)
    table.mul_(2.0)  # the bank changing before backward is caught, not silently wrong
    with pytest.raises(RuntimeError, match="changed between"):
        s3.sum().backward()


@pytest.mark.parametrize(("b", "k", "t"), [(7, 13, 0.07), (1, 1, 0.1), (33, 200, 1.0)])
def test_infonce_shared_equals_cross_entropy_over_shared_scores(b: int, k: int, t: float) -> None:
    """The one-pass InfoNCE over shared negatives is the cross-entropy of [pos | negatives] / t
    with target 0: the same loss and the same gradient to x, and none to the bank's rows."""
    import oocid.method.fast as L

    g = torch.Generator().manual_seed(b * 100 + k)
    x1 = torch.nn.functional.normalize(torch.randn(b, 8, generator=g), dim=1).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    pos = torch.nn.functional.normalize(torch.randn(b, 8, generator=g), dim=1).requires_grad_()
    neg = torch.nn.functional.normalize(torch.randn(k, 8, generator=g), dim=1).requires_grad_()
    neg.data[0] = x1.detach()[0]  # a negative equal to a feature: the largest logit of its row
    got = L.infonce_shared(x1, pos, neg, t)
    (3.0 * got).backward()
    want = torch.nn.functional.cross_entropy(
        torch.cat([(x2 * pos.detach()).sum(1, keepdim=True), x2 @ neg.detach().t()], 1) / t,
        torch.zeros(b, dtype=torch.long))
    (3.0 * want).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-7)
    assert pos.grad is None and neg.grad is None


def test_per_sample_scores_are_float32_under_bf16_autocast() -> None:
    """The custom Functions turn autocast off: under a bf16 autocast their scores and
    gradients are float32 and match a float64 reference to float32 rounding, by either path
    (dense GEMM over a small table, or the gathered blocks over a large one)."""
    import oocid.method.fast as L

    g = torch.Generator().manual_seed(3)
    for rows in (50, 10_000):
        table = F.normalize(torch.randn(rows, 64, generator=g), dim=1)
        pos = torch.randint(0, rows, (9, 13), generator=g)
        x0 = F.normalize(torch.randn(9, 64, generator=g), dim=1)
        w = torch.randn(9, 13, generator=g)
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s = L.negative_scores(x, table, pos)
            (s * w).sum().backward()
        xr = x0.double().requires_grad_()
        ref = torch.bmm(table.double()[pos], xr.unsqueeze(2)).squeeze(2)
        (ref * w.double()).sum().backward()
        assert s.dtype == torch.float32 and x.grad is not None and xr.grad is not None
        torch.testing.assert_close(s.double(), ref.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)
    neg = F.normalize(torch.randn(300, 64, generator=g), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = L.infonce_shared(x0, table[:9], neg, 0.07)
    logits = torch.cat([(x0.double() * table[:9].double()).sum(1, keepdim=True),
                        x0.double() @ neg.double().t()], 1) / 0.07
    want = F.cross_entropy(logits, torch.zeros(9, dtype=torch.long))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)


def test_gather_block_is_cache_sized_on_cpu_and_the_batch_on_cuda() -> None:
    from oocid.method.fast import GATHER_BLOCK_BYTES, GATHER_BLOCK_BYTES_CUDA, gather_block

    cpu, cuda = torch.device("cpu"), torch.device("cuda:1")
    per = 4096 * 128 * 4  # bytes of one sample's K = 4096 rows of D = 128
    assert gather_block(256, 4096, 128, cpu) == GATHER_BLOCK_BYTES // per == 2
    assert gather_block(256, 4096, 128, cuda) == 256  # 512 MiB: the whole batch at once
    assert gather_block(1024, 4096, 128, cuda) == GATHER_BLOCK_BYTES_CUDA // per == 512
    assert gather_block(7, 10**9, 128, cuda) == gather_block(7, 10**9, 128, cpu) == 1
    assert gather_block(3, 0, 128, cuda) == 3
