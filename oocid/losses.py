"""Losses of NPID (METHOD.md sections 1-2) as pure functions on tensors.

Dimension letters: B batch, K negatives per sample, D feature dim, N bank rows.

- `nce_loss`: the paper's noise-contrastive estimation, numerically the official
  `NCEAverage` + `NCECriterion` (uniform noise P_n = 1/N, Z by Monte Carlo).
- `softmax_loss`: the exact non-parametric softmax (official `LinearAverage` + cross-entropy).
- `infonce_loss`: cross-entropy over [positive | K negatives] / t (a later variant, not in the paper).
- `ZEstimator`: the normalising constant Z, one-shot (official) or moving average (the fix).

All math runs in float32 whatever the autocast context: scores are computed from float32
copies of the features and bank rows, so exp(s / 0.07) never overflows float16.
The bank rows (`weights`, `bank`) are treated as constants: no gradient flows into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .gemm import matmul_nt, scores_nt, take_rows


def _check_scores(n_data: int, k: int) -> None:
    if n_data < 1:
        raise ValueError(f"n_data must be >= 1, got {n_data}")
    if k < 1:
        raise ValueError(f"NCE needs at least one negative, got K={k}")


def nce_probs(scores: Tensor, n_data: int, temperature: float, z: Tensor | float | None = None
              ) -> tuple[Tensor, Tensor]:
    """exp(s / t) / Z for scores (B, K+1); returns (P (B, K+1), Z as a 0-d float32 tensor).

    Z None: Z = N * mean(exp(s / t)) over all B*(K+1) entries, positive column included,
    computed without gradient (the official code's estimate)."""
    out = torch.exp(scores.float() / temperature)  # (B, K+1)
    if z is None:
        z_t = (out.detach().mean() * n_data).to(torch.float32)
    else:
        z_t = torch.as_tensor(z, dtype=torch.float32, device=out.device).detach()
    return out / z_t, z_t


def nce_criterion(probs: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """The official NCECriterion on P (B, K+1), column 0 the positive.

    L = -(1/B) [ sum_i log(P_i0 / (P_i0 + c + eps)) + sum_i sum_k log(c / (P_ik + c + eps)) ],
    c = K / N. Negatives are summed, not averaged."""
    b, k1 = probs.shape
    k = k1 - 1
    _check_scores(n_data, k)
    c = k / float(n_data)
    p_pos = probs[:, 0]  # (B,)
    p_neg = probs[:, 1:]  # (B, K)
    ln_pmt = torch.log(p_pos / (p_pos + (c + eps)))
    ln_pon = torch.log(c / (p_neg + (c + eps)))
    return -(ln_pmt.sum() + ln_pon.sum()) / b


def nce_loss(x: Tensor, weights: Tensor, n_data: int, temperature: float,
             z: Tensor | float | None = None, eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    """NCE loss of the paper, as the official code computes it.

    x: (B, D) unit features (gradient flows here); weights: (B, K+1, D) bank rows, column 0 the
    positive v_i (from before this step's update), columns 1..K the sampled negatives.
    z: the normalising constant; None estimates it from this call (N * mean exp over all
    B*(K+1) entries) and returns it, as the official code does on its first batch.
    Returns (loss, z)."""
    if x.dim() != 2 or weights.dim() != 3 or weights.shape[0] != x.shape[0] \
            or weights.shape[2] != x.shape[1]:
        raise ValueError(f"nce_loss: x {tuple(x.shape)} and weights {tuple(weights.shape)} "
                         "must be (B, D) and (B, K+1, D)")
    scores = torch.bmm(weights.detach().float(), x.float().unsqueeze(2)).squeeze(2)  # (B, K+1)
    probs, z_t = nce_probs(scores, n_data, temperature, z)
    return nce_criterion(probs, n_data, eps), z_t


def shared_scores(x: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
    """Scores against one set of negatives shared by the batch.

    x (B, D), positives (B, D), negatives (K, D) -> (B, K+1), column 0 the positive."""
    xf = x.float()
    pos = (xf * positives.detach().float()).sum(1, keepdim=True)  # (B, 1)
    neg = scores_nt(xf, negatives.detach().float())  # (B, K), oneDNN's GEMM on the CPU
    return torch.cat([pos, neg], dim=1)


class _InfoNCEShared(torch.autograd.Function):
    """`infonce_from_scores(shared_scores(x, positives, negatives), t)` in one pass: the loss and
    its gradient to x are computed together in the forward (the backward only scales)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, positives: Tensor, negatives: Tensor, temperature: float
                ) -> Tensor:
        inv_t = 1.0 / temperature
        if x.shape[0] == 0:
            raise ValueError("infonce_shared: an empty batch")
        with torch.autocast(x.device.type, enabled=False):
            s = matmul_nt(x, negatives).mul_(inv_t)  # (B, K) negatives' logits
            s0 = (x * positives).sum(1).mul_(inv_t)  # (B,) the positive's logit
            top = torch.maximum(s.amax(1), s0)  # (B,) row max over [s0 | s]
            e = s.sub_(top[:, None]).exp_()  # in place: exp(s - top)
            e0 = (s0 - top).exp_()
            z = e.sum(1).add_(e0)  # (B,) the softmax's denominator (scaled by exp(-top))
            loss = (z.log() + top - s0).mean()  # mean over b of logsumexp([s0 | s]) - s0
            if not ctx.needs_input_grad[0]:
                return loss
            # d loss / d x_b = (sum_j p_bj neg_j + (p_b0 - 1) pos_b) / (t B), p = softmax row b
            p = e.div_(z[:, None])
            grad = matmul_nt(p, negatives.t()).addcmul_(positives, (e0.div_(z) - 1)[:, None])
            grad.mul_(inv_t / x.shape[0])
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None


def infonce_shared(x: Tensor, positives: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """InfoNCE over [positive | K negatives shared by the batch] / t, gradient to x only:
    x (B, D), positives (B, D), negatives (K, D). The same function as
    `infonce_from_scores(shared_scores(x, positives, negatives), temperature)` (tested to float
    rounding), without materialising the (B, K+1) scores, the cross-entropy's buffers and their
    gradients separately: 1.7 against 2.9 ms for B 256, K 4096 on this project's 2-core CPU,
    where the product itself takes 1.3."""
    return _InfoNCEShared.apply(x.float(), positives.detach().float(), negatives.detach().float(),
                                temperature)


GATHER_BLOCK_BYTES = 4 * 2**20  # rows gathered at once by `gathered_scores` (cache-sized)


def _keep_table(ctx: Any, table: Tensor) -> None:
    """Remember the bank table a forward pass read (not saved: it is the bank itself)."""
    ctx.table, ctx.version = table, table._version


def _kept_table(ctx: Any) -> Tensor:
    """The table `_keep_table` remembered, checked unchanged since the forward pass."""
    if ctx.table._version != ctx.version:
        raise RuntimeError("bank rows changed between the forward and backward pass")
    return ctx.table


class _GatheredScores(torch.autograd.Function):
    """s[b, k] = <x[b], table[pos[b, k]]>, gathered and scored a few samples at a time.

    The official code gathers all B*K rows into one (B, K, D) tensor (512 MB at B 256, K 4096,
    D 128) and keeps it for the backward pass. Here each block of samples gathers its rows into
    a small buffer, scores them and lets them go; the backward pass gathers them again. Same
    numbers up to float rounding, no large allocation, and the gathered rows stay in cache."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, table: Tensor, pos: Tensor) -> Tensor:
        b, k = pos.shape
        block = max(1, GATHER_BLOCK_BYTES // max(1, k * table.shape[1] * 4))
        out = torch.empty(b, k, dtype=torch.float32, device=x.device)
        buf = torch.empty(min(block, b), k, table.shape[1], dtype=table.dtype, device=table.device)
        for s in range(0, b, block):
            e = min(b, s + block)
            rows = take_rows(table, pos[s:e], buf)
            out[s:e] = torch.bmm(rows.view(e - s, k, -1).float(), x[s:e].unsqueeze(2)).squeeze(2)
        ctx.save_for_backward(pos)
        _keep_table(ctx, table)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        (pos,) = ctx.saved_tensors
        table = _kept_table(ctx)
        b, k = pos.shape
        gx = torch.empty(b, table.shape[1], dtype=torch.float32, device=grad.device)
        buf = torch.empty(min(ctx.block, b), k, table.shape[1], dtype=table.dtype, device=table.device)
        for s in range(0, b, ctx.block):
            e = min(b, s + ctx.block)
            rows = take_rows(table, pos[s:e], buf)
            gx[s:e] = torch.bmm(grad[s:e].unsqueeze(1).float(), rows.view(e - s, k, -1).float()).squeeze(1)
        return gx, None, None


def gathered_scores(x: Tensor, table: Tensor, pos: Tensor) -> Tensor:
    """Scores (B, K) of x (B, D) against rows `table[pos]` (pos (B, K)), without materialising
    the (B, K, D) gather; the gradient flows to x only (the bank is a constant)."""
    return _GatheredScores.apply(x.float(), table.detach(), pos)


DENSE_ROWS_PER_NEGATIVE = 32  # `negative_scores` scores the whole table when it has at most
DENSE_MAX_SCORES = 2**26  # this many rows per negative and B * rows stays under this (256 MB
# of float32 scores, held once in the forward and once in the backward). Measured on the CPU;
# on a GPU the product is relatively cheaper still, so the same rule errs on the safe side.


def negative_scores(x: Tensor, table: Tensor, pos: Tensor) -> Tensor:
    """Scores (B, K) of x (B, D) against rows `table[pos]` (pos (B, K)), gradient to x only.

    Per-sample negatives come from a table of T rows (the bank in core, or the cache's slots).
    When T is small next to K, scoring all T rows with one GEMM and picking the (B, K) drawn
    ones (`scores_nt(x, table).gather(1, pos)`; its backward, a scatter into (B, T) and a
    second GEMM) is much cheaper than gathering B*K rows (`gathered_scores`): 256 x 4096
    negatives from 6,000 rows 4 ms against 60 ms on this project's 2-core CPU, from 60,000
    rows 27 against 83, from 128,000 rows 49 against 91 (loss forward + backward). Same sums
    up to float rounding; a row drawn twice gets both gradients either way."""
    b, k = pos.shape
    if dense_scores_apply(b, k, table.shape[0]):
        return _DenseScores.apply(x.float(), table.detach(), pos)
    return gathered_scores(x, table, pos)


def dense_scores_apply(b: int, k: int, t: int) -> bool:
    """Whether `negative_scores` scores a whole table of t rows for (b, k) per-sample draws."""
    return t <= DENSE_ROWS_PER_NEGATIVE * max(k, 1) and b * t <= DENSE_MAX_SCORES


class _DenseScores(torch.autograd.Function):
    """`scores_nt(x, table).gather(1, pos)` holding one (B, T) product at a time: the forward
    keeps only `pos`, the backward scatters the gradient into a fresh (B, T) and multiplies."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, table: Tensor, pos: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            out = matmul_nt(x, table.float()).gather(1, pos)  # (B, K)
        ctx.save_for_backward(pos)
        _keep_table(ctx, table)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (pos,) = ctx.saved_tensors
        table = _kept_table(ctx)
        full = torch.zeros(pos.shape[0], table.shape[0], dtype=torch.float32, device=grad.device)
        full.scatter_add_(1, pos, grad.float())  # a row drawn twice gets both gradients
        with torch.autocast(grad.device.type, enabled=False):
            return matmul_nt(full, table.float().t()), None, None


def softmax_loss(x: Tensor, bank: Tensor, index: Tensor, temperature: float) -> Tensor:
    """Exact non-parametric softmax: mean cross-entropy of (x @ bank^T) / t against `index`.

    x (B, D), bank (N, D) (no gradient), index (B,) int64 instance ids."""
    logits = scores_nt(x, bank) / temperature  # (B, N), oneDNN's GEMM on the CPU both ways
    return F.cross_entropy(logits, index)


def infonce_loss(x: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """Sampled softmax / InfoNCE: cross-entropy over [positive | K negatives] / t.

    x (B, D); weights (B, K+1, D), column 0 the positive."""
    scores = torch.bmm(weights.detach().float(), x.float().unsqueeze(2)).squeeze(2)  # (B, K+1)
    return infonce_from_scores(scores, temperature)


def infonce_from_scores(scores: Tensor, temperature: float) -> Tensor:
    """Cross-entropy with target column 0 on scores (B, K+1)."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float() / temperature, target)


@dataclass
class ZEstimator:
    """The NCE normalising constant Z.

    mode "oneshot": estimated once from the first batch, then fixed (official code, paper default).
    mode "ema": z <- momentum * z + (1 - momentum) * estimate(batch), starting from the first
    batch's estimate (the common fix for the fragile one-shot Z on small data)."""

    mode: str = "oneshot"
    momentum: float = 0.99
    value: float | None = None
    first: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("oneshot", "ema"):
            raise ValueError(f"Z mode must be 'oneshot' or 'ema', got {self.mode!r}")

    def __call__(self, scores: Tensor, n_data: int, temperature: float) -> Tensor:
        """Z to use for this batch's scores (B, K+1); updates the state."""
        if self.value is None or self.mode == "ema":
            est = float((torch.exp(scores.detach().float() / temperature).mean() * n_data).item())
            if self.value is None:
                self.value = est
                self.first = est
            else:
                self.value = self.momentum * self.value + (1.0 - self.momentum) * est
        return torch.tensor(self.value, dtype=torch.float32, device=scores.device)

    def drift(self) -> float:
        """Current Z over the first estimate (1.0 before the first batch)."""
        if self.value is None or not self.first:
            return 1.0
        return self.value / self.first

    def state_dict(self) -> dict[str, float | str | None]:
        return {"mode": self.mode, "momentum": self.momentum, "value": self.value,
                "first": self.first}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"checkpoint Z mode {state.get('mode')!r} != config {self.mode!r}")
        self.momentum = float(state["momentum"])
        self.value = None if state["value"] is None else float(state["value"])
        self.first = None if state["first"] is None else float(state["first"])
