"""One NPID training step, apart from the loop: features -> loss against the bank ->
backward -> optimiser step -> THEN the bank's momentum update, explicitly, where a reader sees it:
    v_i <- normalize(m * v_i + (1 - m) * f_i)      for the step's indices only.

Precision: the backbone may run under autocast (bf16, or fp16 with a grad scaler) on CUDA;
`Embedder.forward` returns float32 features, and every loss (oocid.losses) and the bank stay
float32, so exp(s / t) and the momentum update never see reduced precision.
B batch, K negatives, D dims, N bank rows.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .bank import momentum_update
from .config import Config
from .errors import DivergedError
from .gemm import take_rows
from .losses import (
    ZEstimator,
    infonce_from_scores,
    infonce_shared,
    nce_criterion,
    nce_probs,
    negative_scores,
    shared_scores,
    softmax_loss,
)
from .models import Embedder
from .stream import Batch, mix_seed

MAX_SKIPS_IN_A_ROW = 20  # then training has diverged (NaN weights): stop instead of spinning


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 on CUDA where supported, else fp16 on CUDA, else 32 (CPU)."""
    if device.type != "cuda":
        return "32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "16"
    return precision


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    if device.type == "cuda" and precision in ("bf16", "16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


@dataclass
class StepOut:
    loss: float
    skipped: bool
    z: float | None = None


@dataclass
class NPIDStep:
    """One training step: loss of the batch's features against the bank, optimiser step, then
    the bank's momentum update. Pure of I/O: `bank` is any object with gather / draw /
    update / all_rows (in-core or cached)."""

    cfg: Config
    model: Embedder
    optimizer: torch.optim.Optimizer
    bank: Any
    n_data: int
    zest: ZEstimator | None
    seed: int
    precision: str = "32"
    skipped: int = 0
    skipped_in_a_row: int = 0
    scaler: Any = field(default=None, init=False)
    last_features: Tensor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.precision == "16":
            self.scaler = torch.amp.GradScaler("cuda")

    def loss(self, f: Tensor, index: Tensor, step: int
             ) -> tuple[Tensor, float | None, Tensor | None]:
        """(loss, Z or None, the positives' bank rows as gathered (None for the exact softmax))."""
        lc = self.cfg.loss
        if lc.kind == "auto":
            raise ValueError('loss.kind "auto" must be resolved first (oocid.train.resolve_loss)')
        if lc.kind == "softmax":
            return softmax_loss(f, self.bank.all_rows(), index, lc.temperature), None, None
        b = f.shape[0]
        g = torch.Generator(device=self.bank.device.type if hasattr(self.bank, "device") else "cpu")
        g.manual_seed(mix_seed(self.seed, 6, step))
        pos = self.bank.gather(index)  # (B, D), a copy
        shared = lc.negatives == "shared"
        # drawn and located in one go: from the cache's window, resident, a plain row lookup
        table, at = self.bank.draw((lc.nce_k,) if shared else (b, lc.nce_k), g)  # (K,) | (B, K)
        if shared:
            neg = take_rows(table, at)  # (K, D)
            if lc.kind == "infonce":  # loss and gradient in one pass
                return infonce_shared(f, pos, neg, lc.temperature), None, pos
            scores = shared_scores(f, pos, neg)  # (B, K+1)
        else:
            pos_s = (f.float() * pos.float()).sum(1, keepdim=True)  # (B, 1)
            neg_s = negative_scores(f, table, at)  # (B, K): one GEMM, or gathered block by block
            scores = torch.cat([pos_s, neg_s], dim=1)  # (B, K+1)
        if lc.kind == "infonce":
            return infonce_from_scores(scores, lc.temperature), None, pos
        assert self.zest is not None
        z = self.zest(scores, self.n_data, lc.temperature)
        probs, _ = nce_probs(scores, self.n_data, lc.temperature, z)
        return nce_criterion(probs, self.n_data, lc.eps), float(z.item()), pos

    def __call__(self, batch: Batch | list[Batch], step: int, lr: float) -> StepOut:
        """One optimiser step over one batch, or over micro-batches whose gradients accumulate
        (each micro-batch's loss is against the bank before this step's update)."""
        micro = batch if isinstance(batch, list) else [batch]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        device = micro[0].images.device
        feats, total, z = [], 0.0, None
        olds: list[Tensor | None] = []  # each micro-batch's positives as the loss gathered them
        n_all = sum(int(b.index.numel()) for b in micro)
        for i, b in enumerate(micro):
            x = b.images
            if self.cfg.model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.precision, device):
                f = self.model(x)  # (B, D) unit, float32 (Embedder casts before normalising)
            # non-finite features are caught before the loss so they never reach Z's estimate;
            # f's rows are unit (or zero), so its sum is finite iff every entry is (one
            # reduction: isfinite().all() is several passes, 50 us against 4 on the CPU)
            finite = math.isfinite(float(f.detach().sum()))
            loss, z, old = self.loss(f, b.index, step * self.cfg.optim.accumulate + i) if finite \
                else (torch.tensor(float("nan")), None, None)  # float32
            value = float(loss.item())
            if not finite or not math.isfinite(value):
                # never write a non-finite feature into the bank: skip, count, carry on
                self.skipped += 1
                self.skipped_in_a_row += 1
                if self.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
                    raise DivergedError(
                        f"training diverged: {self.skipped_in_a_row} steps in a row (up to step "
                        f"{step}) gave non-finite features or loss; none reached the bank and the "
                        "last checkpoint is intact; lower optim.lr (or use train.precision = 32)")
                self.optimizer.zero_grad(set_to_none=True)
                self._end_step()
                return StepOut(float("nan"), True, z)
            weighted = loss * (b.index.numel() / n_all)
            if self.scaler is not None:
                self.scaler.scale(weighted).backward()
            else:
                weighted.backward()
            feats.append(f.detach())
            olds.append(old)
            self.last_features = feats[-1]
            total += value * b.index.numel()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():  # the memory update, after the optimiser step
            # v_i before this step: the rows the loss gathered (a step's indices are distinct
            # and the bank is written only here), else gathered now (the exact softmax)
            for b, f, v in zip(micro, feats, olds, strict=True):
                v = self.bank.gather(b.index) if v is None else v
                new = momentum_update(v, f, self.cfg.bank.momentum)
                self.bank.update(b.index, new)
        self._end_step()
        self.skipped_in_a_row = 0
        return StepOut(total / max(n_all, 1), False, z)

    def _end_step(self) -> None:
        if hasattr(self.bank, "end_step"):
            self.bank.end_step()
