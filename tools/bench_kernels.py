#!/usr/bin/env python3
"""The CPU kernels behind oocid's speed choices, measured on this machine.

    gemm    (1024, 128) x (128, 1024) float32, torch.mm (MKL on x86 builds) against oneDNN's
            float32 linear (oocid.method.kernels.matmul_nt when kernels.onednn_gemm() holds): the kNN
            scan's tile. GFLOP/s.
    shared  (256, 128) x (128, 4096): the shared negatives' scores, same two kernels. GFLOP/s.
    gather  4,096 rows of a (126,976, 128) float32 cache table (a 10 % cache of 1.28e6 rows):
            advanced indexing table[idx] against oocid.method.kernels.take_rows (index_select). ms.
    per-sample gather  B x K = 256 x 4,096 rows of the same table (the per-sample negatives of
            one step, gathered once, into a buffer kept across calls): ms and GB/s of rows read.

Usage:
    python tools/bench_kernels.py            # ~20 s on 2 cores
Prints a table; the LAST line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch


def per_call_s(f: Callable[[], object], min_s: float = 0.5) -> float:
    """Median seconds per call over repeats of at least `min_s` each (after one warm-up call)."""
    f()
    times = []
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while True:
            f()
            n += 1
            if time.perf_counter() - t0 >= min_s / 5:
                break
        times.append((time.perf_counter() - t0) / n)
    return sorted(times)[len(times) // 2]


def mm_call(x: torch.Tensor, w: torch.Tensor) -> Callable[[], object]:
    out = torch.empty(x.shape[0], w.shape[0])
    return lambda: torch.mm(x, w.t(), out=out)


def onednn_call(x: torch.Tensor, w: torch.Tensor) -> Callable[[], object]:
    from oocid.method.kernels import matmul_nt

    return lambda: matmul_nt(x, w)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from oocid.method.kernels import onednn_gemm, take_rows

    g = torch.Generator().manual_seed(0)
    res: dict[str, float | bool | None] = {"threads": a.threads, "onednn": onednn_gemm()}
    for name, m, n in (("gemm", 1024, 1024), ("shared", 256, 4096)):
        x, w = torch.randn(m, 128, generator=g), torch.randn(n, 128, generator=g)
        flops = 2 * m * n * 128
        res[f"{name}_mm_gflops"] = flops / per_call_s(mm_call(x, w)) / 1e9
        res[f"{name}_onednn_gflops"] = (flops / per_call_s(onednn_call(x, w)) / 1e9
                                        if res["onednn"] else None)
    table = torch.randn(126_976, 128, generator=g)
    idx = torch.randint(0, table.shape[0], (4096,), generator=g)
    res["gather_index_ms"] = per_call_s(lambda: table[idx]) * 1e3
    res["gather_take_rows_ms"] = per_call_s(lambda: take_rows(table, idx)) * 1e3
    big = torch.randint(0, table.shape[0], (256 * 4096,), generator=g)
    buf = torch.empty(big.numel(), 128)  # into a buffer held across calls: the read, not page faults
    s = per_call_s(lambda: torch.index_select(table, 0, big, out=buf), 1.0)
    res["per_sample_gather_ms"] = s * 1e3
    res["per_sample_gather_gb_s"] = big.numel() * 128 * 4 / s / 1e9

    def f(v: float | bool | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    print(f"torch {torch.__version__}, threads {a.threads}, oneDNN float32 linear usable: {res['onednn']}")
    print(f"{'kernel':<42} {'torch default':>14} {'oocid':>10}")
    print(f"{'GEMM (1024,128)x(128,1024) GFLOP/s':<42} {f(res['gemm_mm_gflops'], '14.0f')} "
          f"{f(res['gemm_onednn_gflops'], '10.0f')}")
    print(f"{'GEMM (256,128)x(128,4096) GFLOP/s':<42} {f(res['shared_mm_gflops'], '14.0f')} "
          f"{f(res['shared_onednn_gflops'], '10.0f')}")
    print(f"{'gather 4,096 of 126,976 rows, ms':<42} {f(res['gather_index_ms'], '14.3f')} "
          f"{f(res['gather_take_rows_ms'], '10.3f')}")
    print(f"{'gather 256 x 4,096 rows (per-sample), ms':<42} {'':>14} "
          f"{f(res['per_sample_gather_ms'], '10.1f')}  ({res['per_sample_gather_gb_s']:.1f} GB/s)")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
