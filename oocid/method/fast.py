"""Fast forms of NPID's losses: the same sums as the plain forms in `oocid.method.npid`, computed
with less memory traffic; `NPIDStep.loss` picks them and the tests check each against its plain
form (tests/method/test_fast.py). Timings behind the choices: docs/benchmarks.md.

Dimension letters: B batch, K negatives per sample, D feature dim, T rows of a table the
negatives are drawn from (the bank held whole, or the cache's resident window).

- `softmax_loss`: the exact softmax with the scores through `kernels.scores_nt` (oneDNN's GEMM
  both ways on the CPU).
- `shared_scores`, `infonce_shared`: one set of K negatives shared by the batch; InfoNCE's loss
  and gradient in one pass.
- `negative_scores`: per-sample negatives `table[pos]`, scored by one GEMM over a small table
  and a pick (`_DenseScores`), or gathered a block of samples at a time (`_GatheredScores`),
  never materialising the (B, K, D) gather.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from oocid.method.kernels import matmul_nt, scores_nt, take_rows


def softmax_loss(x: Tensor, bank: Tensor, index: Tensor, temperature: float) -> Tensor:
    """`npid.softmax_loss` with the (B, N) scores through `scores_nt`: x (B, D), bank (N, D)
    (no gradient), index (B,) int64 instance ids."""
    logits = scores_nt(x, bank) / temperature  # (B, N)
    return F.cross_entropy(logits, index)


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
    gradients separately (docs/benchmarks.md, "kernels")."""
    out = _InfoNCEShared.apply(x.float(), positives.detach().float(), negatives.detach().float(),
                               temperature)
    return cast(Tensor, out)


GATHER_BLOCK_BYTES = 4 * 2**20  # rows gathered at once by `gathered_scores` on the CPU
# (sized for its cache); on a GPU the gather is bandwidth-bound and each block is a kernel
# launch, so a block is as large as this (the whole batch at B 256, K 4096, D 128: 512 MiB)
GATHER_BLOCK_BYTES_CUDA = 2**30


def gather_block(b: int, k: int, d: int, device: torch.device) -> int:
    """Samples per block of `gathered_scores` for (b, k) draws of d-dim float32 rows gathered
    on `device`: a few MiB on the CPU, up to GATHER_BLOCK_BYTES_CUDA (whole batch) elsewhere."""
    per_sample = max(1, k * d * 4)
    if device.type == "cpu":
        return max(1, GATHER_BLOCK_BYTES // per_sample)
    return max(1, min(b, GATHER_BLOCK_BYTES_CUDA // per_sample))


def _keep_table(ctx: Any, table: Tensor) -> None:
    """Remember the bank table a forward pass read (not saved: it is the bank itself)."""
    ctx.table, ctx.version = table, table._version


def _kept_table(ctx: Any) -> Tensor:
    """The table `_keep_table` remembered, checked unchanged since the forward pass."""
    if ctx.table._version != ctx.version:
        raise RuntimeError("bank rows changed between the forward and backward pass")
    return cast(Tensor, ctx.table)


class _GatheredScores(torch.autograd.Function):
    """s[b, k] = <x[b], table[pos[b, k]]>, gathered and scored a few samples at a time.

    The official code gathers all B*K rows into one (B, K, D) tensor (512 MB at B 256, K 4096,
    D 128) and keeps it for the backward pass. Here each block of samples gathers its rows into
    a small buffer, scores them and lets them go; the backward pass gathers them again. Same
    numbers up to float rounding, no large allocation, and the gathered rows stay in cache."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, table: Tensor, pos: Tensor) -> Tensor:
        b, k = pos.shape
        block = gather_block(b, k, table.shape[1], table.device)
        out = torch.empty(b, k, dtype=torch.float32, device=x.device)
        buf = torch.empty(min(block, b), k, table.shape[1], dtype=table.dtype, device=table.device)
        with torch.autocast(x.device.type, enabled=False):  # float32 scores under autocast too
            for s in range(0, b, block):
                e = min(b, s + block)
                rows = take_rows(table, pos[s:e], buf)
                out[s:e] = torch.bmm(rows.view(e - s, k, -1).float(),
                                     x[s:e].unsqueeze(2)).squeeze(2)
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
        with torch.autocast(grad.device.type, enabled=False):
            for s in range(0, b, ctx.block):
                e = min(b, s + ctx.block)
                rows = take_rows(table, pos[s:e], buf)
                gx[s:e] = torch.bmm(grad[s:e].unsqueeze(1).float(),
                                    rows.view(e - s, k, -1).float()).squeeze(1)
        return gx, None, None


def gathered_scores(x: Tensor, table: Tensor, pos: Tensor) -> Tensor:
    """Scores (B, K) of x (B, D) against rows `table[pos]` (pos (B, K)), without materialising
    the (B, K, D) gather; the gradient flows to x only (the bank is a constant)."""
    return cast(Tensor, _GatheredScores.apply(x.float(), table.detach(), pos))


DENSE_ROWS_PER_NEGATIVE = 32  # `negative_scores` scores the whole table when it has at most
DENSE_MAX_SCORES = 2**26  # this many rows per negative and B * rows stays under this (256 MB
# of float32 scores, held once in the forward and once in the backward). Chosen from CPU
# measurements; on a GPU the product is relatively cheaper still, so the rule errs on the safe side.


def negative_scores(x: Tensor, table: Tensor, pos: Tensor) -> Tensor:
    """Scores (B, K) of x (B, D) against rows `table[pos]` (pos (B, K)), gradient to x only.

    Per-sample negatives come from a table of T rows (the bank in core, or the cache's slots).
    When T is small next to K, scoring all T rows with one GEMM and picking the (B, K) drawn
    ones (`scores_nt(x, table).gather(1, pos)`; its backward, a scatter into (B, T) and a
    second GEMM) is much cheaper than gathering B*K rows (`gathered_scores`) while T is at most
    a few times K (docs/benchmarks.md, "kernels"). Same sums up to float rounding; a row drawn
    twice gets both gradients either way."""
    b, k = pos.shape
    if dense_scores_apply(b, k, table.shape[0]):
        return cast(Tensor, _DenseScores.apply(x.float(), table.detach(), pos))
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
