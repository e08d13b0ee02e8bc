"""NPID in one file: Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (CVPR 2018), as oocid trains it. docs/method.md derives every line.

Every training image is its own class. A network maps image i to a unit feature f_i; a memory
bank keeps one unit row v_i per image. A step scores the batch's features against their own
rows (positives) and against other rows (negatives), takes an optimiser step, and THEN moves
each image's row towards its new feature:  v_i <- normalize(m v_i + (1 - m) f_i).

Dimension letters: B batch, K negatives per sample, D feature dim (128), N bank rows.
The losses below are the plain forms, written as the paper states them; `oocid.method.fast`
holds faster forms of the same sums (each tested equal to these), and `NPIDStep.loss` picks
them. All loss math is float32 whatever the autocast context (exp(s / 0.07) overflows float16),
and bank rows are constants: no gradient flows into the bank.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from oocid.config import Config, LossConfig, Precision
from oocid.data.batch import Batch, mix_seed
from oocid.device import autocast, make_grad_scaler
from oocid.errors import DivergedError
from oocid.method import fast
from oocid.method.kernels import take_rows
from oocid.method.protocol import Bank
from oocid.method.zest import ZEstimator
from oocid.models import Embedder

MAX_SKIPS_IN_A_ROW = 20  # then training has diverged (NaN weights): stop instead of spinning


def momentum_update(old: Tensor, new: Tensor, momentum: float) -> Tensor:
    """v <- normalize(m * v_old + (1 - m) * f), weight m on the OLD row (official: m = 0.5).
    old, new (B, D) -> (B, D) unit rows in old's dtype; the norm is clamped at 1e-12 only to
    keep an exactly cancelling pair finite."""
    mixed = old.float() * momentum + new.detach().float() * (1.0 - momentum)  # (B, D)
    norm = mixed.pow(2).sum(1, keepdim=True).pow(0.5).clamp_min(1e-12)  # (B, 1)
    return (mixed / norm).to(old.dtype)


def random_unit_rows(n: int, d: int, generator: torch.Generator | None = None) -> Tensor:
    """A new bank: (n, d) float32 rows uniform on the sphere (normal draws, L2-normalised)."""
    rows = torch.randn(n, d, generator=generator)
    return rows.div(rows.norm(dim=1, keepdim=True).clamp_min(1e-12))


def softmax_loss(x: Tensor, bank: Tensor, index: Tensor, temperature: float) -> Tensor:
    """The exact non-parametric softmax: P(i | f) = exp(v_i.f / t) / sum_j exp(v_j.f / t),
    loss -mean log P(index | x). x (B, D), bank (N, D), index (B,) int64 instance ids."""
    logits = x.float() @ bank.detach().float().t() / temperature  # (B, N)
    return F.cross_entropy(logits, index)


def nce_probs(scores: Tensor, n_data: int, temperature: float, z: Tensor | float | None = None
              ) -> tuple[Tensor, Tensor]:
    """P = exp(s / t) / Z for scores (B, K+1); returns (P (B, K+1), Z as a 0-d float32 tensor).
    z None: Z = N * mean exp(s / t) over all B*(K+1) entries, positive column included, without
    gradient (the official code's Monte-Carlo estimate)."""
    out = torch.exp(scores.float() / temperature)  # (B, K+1)
    if z is None:
        z_t = (out.detach().mean() * n_data).to(torch.float32)
    else:
        z_t = torch.as_tensor(z, dtype=torch.float32, device=out.device).detach()
    return out / z_t, z_t


def nce_criterion(probs: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """The official NCECriterion on P (B, K+1), column 0 the positive, c = K / N (= K * P_n):
    L = -(1/B) [ sum_i log(P_i0 / (P_i0 + c + eps)) + sum_i sum_k log(c / (P_ik + c + eps)) ].
    Negatives are summed, not averaged. A negative's term is taken as the equal
    -log1p((P_ik + eps) / c): each is about -1/K, and the ratio c / (P_ik + c + eps), rounded
    to float32 next to 1, put the same error into all K of them (2e-4 of the loss at K 4096)."""
    b, k = probs.shape[0], probs.shape[1] - 1
    if n_data < 1 or k < 1:
        raise ValueError(f"NCE needs N >= 1 and K >= 1 negatives, got N={n_data}, K={k}")
    c = k / float(n_data)
    p_pos, p_neg = probs[:, 0], probs[:, 1:]  # (B,), (B, K)
    ln_pmt = torch.log(p_pos / (p_pos + (c + eps)))
    ln_pon = -torch.log1p((p_neg + eps) / c)  # log(c / (P + c + eps))
    return -(ln_pmt.sum() + ln_pon.sum()) / b


def nce_loss(x: Tensor, weights: Tensor, n_data: int, temperature: float,
             z: Tensor | float | None = None, eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    """The paper's NCE with uniform noise P_n = 1/N, as the official code computes it.
    x (B, D) unit features; weights (B, K+1, D) bank rows, column 0 the positive v_i (before
    this step's update), columns 1..K the sampled negatives. z None estimates Z from this call,
    as the official code does once on its first batch. Returns (loss, Z)."""
    if x.dim() != 2 or weights.dim() != 3 or weights.shape[0] != x.shape[0] \
            or weights.shape[2] != x.shape[1]:
        raise ValueError(f"nce_loss: x {tuple(x.shape)} and weights {tuple(weights.shape)} "
                         "must be (B, D) and (B, K+1, D)")
    scores = torch.bmm(weights.detach().float(), x.float().unsqueeze(2)).squeeze(2)  # (B, K+1)
    probs, z_t = nce_probs(scores, n_data, temperature, z)
    return nce_criterion(probs, n_data, eps), z_t


def infonce_from_scores(scores: Tensor, temperature: float) -> Tensor:
    """Cross-entropy with target column 0 over scores (B, K+1) / t."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float() / temperature, target)


def infonce_loss(x: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """InfoNCE (a later variant, not in the paper): softmax over [positive | K negatives] / t.
    x (B, D); weights (B, K+1, D), column 0 the positive."""
    scores = torch.bmm(weights.detach().float(), x.float().unsqueeze(2)).squeeze(2)  # (B, K+1)
    return infonce_from_scores(scores, temperature)


def bank_loss(f: Tensor, index: Tensor, bank: Bank, lc: LossConfig, n_data: int,
              zest: ZEstimator | None, generator: torch.Generator
              ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The loss of features f (B, D) of images `index` (B,) against the bank, by `lc.kind`:
    returns (loss, Z (0-d float64, on the device) or None, the positives' rows v_i as gathered;
    None for the exact softmax)."""
    if lc.kind == "auto":
        raise ValueError('loss.kind "auto" must be resolved first (oocid.train.setup.resolve_loss)')
    if lc.kind == "softmax":  # scores against all N rows (the fast GEMM: fast.softmax_loss)
        return fast.softmax_loss(f, bank.all_rows(), index, lc.temperature), None, None
    b, k, shared = f.shape[0], lc.nce_k, lc.negatives == "shared"
    pos = bank.gather(index)  # (B, D) v_i, a copy
    # negatives, uniform over the bank (over the cache's window when it is partial)
    table, at = bank.draw((k,) if shared else (b, k), generator,  # at: (K,) | (B, K)
                          score_whole=lambda t: fast.dense_scores_apply(b, k, t), own=index)
    if shared:
        neg = take_rows(table, at)  # (K, D)
        if lc.kind == "infonce":
            return fast.infonce_shared(f, pos, neg, lc.temperature), None, pos
        scores = fast.shared_scores(f, pos, neg)  # (B, K+1)
    else:
        pos_s = (f.float() * pos.float()).sum(1, keepdim=True)  # (B, 1)
        scores = torch.cat([pos_s, fast.negative_scores(f, table, at)], dim=1)  # (B, K+1)
    if lc.kind == "infonce":
        return infonce_from_scores(scores, lc.temperature), None, pos
    if zest is None:
        raise ValueError("NCE needs a ZEstimator for its normalising constant Z")
    z = zest(scores, n_data, lc.temperature)
    probs, _ = nce_probs(scores, n_data, lc.temperature, z)
    return nce_criterion(probs, n_data, lc.eps), zest.z, pos  # Z left on the device: no sync


@dataclass
class StepOut:
    loss: float
    skipped: bool
    z: Tensor | None = None  # NCE's Z, 0-d float64 on the device (float() reads it back)


# True during an idle process's forward (`NPIDStep._idle`): layers that take part in
# collectives in training (oocid.distributed.batchnorm) join them with nothing of their own.
IDLE_FORWARD: ContextVar[bool] = ContextVar("IDLE_FORWARD", default=False)


class StepSync(Protocol):
    """What a step needs from the other processes of a multi-process run (oocid.distributed.sync):
    each call is a collective, made by every process in the same order."""

    def batch_weight(self, n: int) -> float | None:
        """world size x n / (samples of this step over all processes): scales this process's
        mean loss so that the averaged gradient is the mean over the whole step's samples;
        None when no process has a sample this step (all skip it alike)."""

    def all_finite(self, ok: bool) -> bool:
        """True when every process's features and loss are finite (else all skip together)."""

    def agree_z(self, estimate: Tensor, weight: float) -> Tensor:
        """The weighted mean of the processes' Z estimates, 0-d float64 tensors on the device
        (`ZEstimator.agree`; an idle process gives weight 0)."""


@dataclass
class NPIDStep:
    """One training step: features -> loss against the bank -> backward -> optimiser step ->
    THEN the bank's momentum update, explicitly, for the step's indices only. Pure of I/O:
    `bank` is anything with the `Bank` protocol (held whole, or a cache over the disk).

    Several processes (`sync`, the model under DistributedDataParallel): each steps on its own
    batch against its own part of the bank; a process with no batch left in the epoch (None)
    still takes part in the step's collectives with a zero gradient from `idle_input`."""

    cfg: Config
    model: Embedder
    optimizer: torch.optim.Optimizer
    bank: Bank
    n_data: int
    zest: ZEstimator | None
    seed: int
    precision: Precision = "32"
    sync: StepSync | None = None
    idle_input: Tensor | None = None  # (2, C, H, W): the idle forward of a multi-process step
    skipped: int = 0  # steps skipped for non-finite features or loss, over the run
    skipped_in_a_row: int = 0
    scaler_skips: int = 0  # fp16: optimiser steps the loss scaler skipped (inf/nan gradients)

    def __post_init__(self) -> None:
        self.scaler = make_grad_scaler(self.precision)  # fp16 only; None otherwise
        self.last_features: Tensor | None = None

    def loss(self, f: Tensor, index: Tensor, step: int
             ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """`bank_loss` with this step's negatives drawn from a generator seeded by (seed, step)."""
        g = torch.Generator(device=self.bank.device)
        g.manual_seed(mix_seed(self.seed, 6, step))
        return bank_loss(f, index, self.bank, self.cfg.loss, self.n_data, self.zest, g)

    def _no_sync(self, last: bool) -> AbstractContextManager[Any]:
        """DistributedDataParallel averages gradients on the last micro-batch's backward only."""
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if no_sync is not None and not last else nullcontext()

    def __call__(self, batch: Batch | list[Batch | None] | None, step: int, lr: float) -> StepOut:
        """One optimiser step over one batch, or over micro-batches whose gradients accumulate
        (each micro-batch's loss is against the bank before this step's update)."""
        micro = batch if isinstance(batch, list) else [batch]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        feats, olds, total, z = [], [], 0.0, None
        n_all = sum(int(b.index.numel()) for b in micro if b is not None)
        weight = self.sync.batch_weight(n_all) if self.sync is not None else 1.0
        if weight is None:  # no process has a sample (bad ones only): no update of any kind,
            self.bank.end_step()  # not even the optimiser's momentum and weight decay
            return StepOut(0.0, False, None)
        for i, b in enumerate(micro):
            with self._no_sync(i == len(micro) - 1):
                if b is None:
                    if not self._idle(step):
                        return self._skip(step, z)
                    continue
                x = b.images
                if self.cfg.model.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(self.precision, x.device):
                    f = self.model(x)  # (B, D) unit, float32 (Embedder normalises in float32)
                z_before = self.zest.snapshot() if self.zest is not None else None
                loss, z, old = self.loss(f, b.index, step * self.cfg.optim.accumulate + i)
                # one host sync checks both: f's rows are unit, so its sum is finite iff every
                # entry is; a non-finite feature never reaches the bank, nor Z's estimate (undone)
                f_sum, value = torch.stack([f.detach().sum(), loss.detach().float()]).tolist()
                ok = math.isfinite(f_sum) and math.isfinite(value)
                if self.sync is not None:
                    ok = self.sync.all_finite(ok)
                if not ok:
                    if self.zest is not None and z_before is not None:
                        self.zest.restore(z_before)
                    return self._skip(step, z if math.isfinite(f_sum) else None)
                weighted = loss * (b.index.numel() / n_all)
                if weight != 1.0:
                    weighted = weighted * weight
                (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
            feats.append(f.detach())
            olds.append(old)
            total += value * b.index.numel()
        if feats:
            self.last_features = feats[-1]
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped if a gradient is inf/nan
            self.scaler.update()  # ... and then the scale is lowered: count those
            if self.scaler.get_scale() < scale:
                self.scaler_skips += 1
        else:
            self.optimizer.step()
        with torch.no_grad():  # the memory update, after the optimiser step
            real = [b for b in micro if b is not None]
            for b, f, v in zip(real, feats, olds, strict=True):
                # v_i before this step: the rows the loss gathered (a step's indices are
                # distinct, and the bank is written only here), else gathered now (softmax)
                v = self.bank.gather(b.index) if v is None else v
                self.bank.update(b.index, momentum_update(v, f, self.cfg.bank.momentum))
        self.bank.end_step()
        self.skipped_in_a_row = 0
        return StepOut(total / max(n_all, 1), False, z)

    def _idle(self, step: int) -> bool:
        """A micro-batch this process does not have: the collectives of a real one in the same
        order (the model's forward, which under DistributedDataParallel may hold collectives
        of its own, then Z's agreement and the finite check, then the backward), with a forward
        of `idle_input` in eval mode (running statistics untouched) and a zero gradient.
        False when another process's micro-batch was not finite (all skip the step)."""
        if self.sync is None or self.idle_input is None:
            raise ValueError("an idle micro-batch needs a StepSync and an idle_input")
        self.model.eval()
        token = IDLE_FORWARD.set(True)
        try:
            with autocast(self.precision, self.idle_input.device):
                f = self.model(self.idle_input)
        finally:
            IDLE_FORWARD.reset(token)
            self.model.train()
        if getattr(self.bank, "exchange", None) is not None:  # the negatives' exchange
            g = torch.Generator(device=self.bank.device)
            g.manual_seed(mix_seed(self.seed, 6, step))
            self.bank.draw((1, 1), g)
        z_before = self.zest.snapshot() if self.zest is not None else None
        if self.zest is not None:
            self.zest.idle(f.device)
        if not self.sync.all_finite(True):
            if self.zest is not None and z_before is not None:
                self.zest.restore(z_before)
            return False
        zero = f.float().sum() * 0.0
        (self.scaler.scale(zero) if self.scaler is not None else zero).backward()
        return True

    def _skip(self, step: int, z: Tensor | None) -> StepOut:
        """Never write a non-finite feature into the bank: skip the step, count it, carry on."""
        self.skipped += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise DivergedError(
                f"training diverged: {self.skipped_in_a_row} steps in a row (up to step {step}) "
                "gave non-finite features or loss; none reached the bank and the last checkpoint "
                "is intact; lower --lr (or use --precision 32)")
        self.optimizer.zero_grad(set_to_none=True)
        self.bank.end_step()
        return StepOut(float("nan"), True, z)
