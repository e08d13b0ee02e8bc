"""BatchNorm over the global batch on the CPU (gloo), where torch's SyncBatchNorm does not run.

Each BatchNorm2d layer all-reduces its batch's per-channel sum, sum of squares and count
(`_AllSum`, whose backward sums the gradient over the processes the same way), normalises with
the global mean and variance, and moves its running statistics as one process over the global
batch would. Every process calls the same all-reduces in the same order; a process with no
batch this step (`oocid.method.npid.IDLE_FORWARD`) joins them with a count of zero. Checked
against one process's BatchNorm2d over the concatenated batch (tests/distributed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from oocid.method.npid import IDLE_FORWARD


class _AllSum(torch.autograd.Function):
    """The sum over processes of a tensor; the gradient of each input is the sum over processes
    of the output's gradients (every process's loss depends on every process's input)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics are those of every process's batch together."""

    def forward(self, x: Tensor) -> Tensor:
        idle = IDLE_FORWARD.get()
        if not self.training and not idle:
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        n_local = 0.0 if idle else float(x.numel() // c)
        part = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)),
                          torch.tensor([n_local], device=x.device)])
        if idle:  # nothing of its own, but the same graph: the backward's all-reduce too
            part = part * 0.0
        total: Tensor = _AllSum.apply(part)
        n = total[-1].clamp_min(1.0)
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0.0)  # biased, as BatchNorm's
        if self.track_running_stats and self.running_mean is not None \
                and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        out: Tensor = y.to(x.dtype)
        return out


def global_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm2d replaced by a GlobalBatchNorm2d holding the same
    parameters and buffers (the state dict keeps its keys)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(child.buffers()).device)
            setattr(module, name, new)
        else:
            global_batchnorm(child)
    return module
