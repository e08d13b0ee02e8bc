"""The two kernels under the losses and the kNN scan: float32 products a @ b^T (through oneDNN
on the CPU where torch has it) and the row gather the banks and losses use (`take_rows`).

On the CPU torch.mm runs Intel MKL, which on other vendors' AVX-512 cores (AMD Zen 4/5) runs its
AVX2 kernels, about half the speed of oneDNN's float32 kernel (the one torch's own linear layers
use under torch.compile) on the kNN scan's (1024, 128) x (128, 1024) tiles (tools/bench_kernels.py,
docs/benchmarks.md). Same float32 arithmetic, a faster kernel; checked once against float64, so a
build without the op, or one that would round through bfloat16, keeps torch.mm.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


@functools.cache
def onednn_gemm() -> bool:
    """Whether torch has oneDNN's float32 linear and it computes q @ w^T to float32 accuracy."""
    try:
        g = torch.Generator().manual_seed(0)
        q, w = torch.randn(64, 128, generator=g), torch.randn(96, 128, generator=g)
        got = torch.ops.mkldnn._linear_pointwise(q, w, None, "none", [], "")
        err = float((got.double() - q.double() @ w.double().t()).abs().max())
        return got.dtype == torch.float32 and got.shape == (64, 96) and err < 1e-4
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


def matmul_nt(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a (m, D) @ b (n, D)^T as float32 (m, n), no autograd: oneDNN's GEMM for float32 CPU
    tensors where it is there and correct (`onednn_gemm`), else torch.mm (into `out` if given)."""
    if a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 and onednn_gemm():
        return cast(Tensor, torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    return torch.mm(a, b.t(), out=out)


class _ScoresNT(torch.autograd.Function):
    """x @ c^T in float32 with the gradient to x only (c is a constant: bank rows); autocast is
    off inside, so the product and its gradient stay float32 on any device."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, c: Tensor) -> Tensor:
        ctx.save_for_backward(c)
        with torch.autocast(x.device.type, enabled=False):
            return matmul_nt(x, c)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (c,) = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):  # oneDNN takes the transposed view
            return matmul_nt(grad.float().contiguous(), c.t()), None


def scores_nt(x: Tensor, c: Tensor) -> Tensor:
    """x (B, D) @ c (K, D)^T as float32 with autograd to x (c detached), through `matmul_nt`
    both ways."""
    return cast(Tensor, _ScoresNT.apply(x.float(), c.detach().float()))


def take_rows(table: Tensor, pos: Tensor, out: Tensor | None = None) -> Tensor:
    """table[pos] as (..., D) through index_select (several times faster than advanced indexing
    on the CPU for a few thousand 128-float rows: tools/bench_kernels.py), into `out`
    (contiguous, numel >= pos.numel() * D; its front is used) if given."""
    flat = pos.reshape(-1)
    if out is not None:
        out = out.view(-1)[: flat.numel() * table.shape[1]].view(-1, table.shape[1])
    return torch.index_select(table, 0, flat, out=out).view(*pos.shape, table.shape[1])
