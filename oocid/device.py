"""Where and how a run computes: the device, mixed precision, and the CPU allocator setting.

Nothing in oocid calls `.cuda()`: a `torch.device` is resolved here once and passed in.
"""

from __future__ import annotations

import ctypes
import functools
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from oocid.config import Precision
from oocid.errors import InputError


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA when available, else the CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}") from None


def use_device(device: torch.device) -> None:
    """Prepare this process to train on `device`: for cuda:N make it the thread's current CUDA
    device (else stray allocations, library handles and the DataLoader's pinned buffers land on
    GPU 0), and let cuDNN pick its fastest convolution algorithms for the run's fixed shapes.
    Nothing on the CPU. Other threads that touch CUDA set the device themselves (IOThread)."""
    if device.type != "cuda":
        return
    if device.index is not None:
        torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """"auto": bf16 on CUDA where the hardware has it (Ampere on), else fp16 on CUDA, else 32
    (CPU). Emulated bf16 (V100, T4) does not count: it runs at fp32 speed or worse."""
    if device.type != "cuda":
        return "32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "16"
    return precision


def autocast(precision: Precision, device: torch.device) -> AbstractContextManager[Any]:
    """The backbone's autocast context: bf16 or fp16 on CUDA, nothing otherwise."""
    if device.type == "cuda" and precision in ("bf16", "16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def make_grad_scaler(precision: Precision) -> Any:
    """The loss scaler fp16 needs (None for every other precision)."""
    return torch.amp.GradScaler("cuda") if precision == "16" else None


@functools.cache
def keep_large_buffers() -> bool:
    """Tell glibc's malloc to serve blocks up to 256 MiB (32 MiB on an older glibc) from its heap
    and keep twice that at its top (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD), instead of
    mapping each large block afresh and handing it back on free. A CPU training step allocates
    the same multi-MB activation and gradient buffers every step; freshly mapped, each is
    page-faulted in again. The price: the process keeps its peak heap. Process-wide, once;
    returns whether it applied (False off glibc). Measured effect: docs/benchmarks.md."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    for limit in (256 << 20, 32 << 20):  # older glibc refuses more than 32 MiB
        if libc.mallopt(m_mmap_threshold, limit) == 1:
            # keep up to twice that at the top of the heap, as glibc's own adaptive rule does
            libc.mallopt(m_trim_threshold, 2 * limit)
            return True
    return False
