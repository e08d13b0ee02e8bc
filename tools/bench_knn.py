"""Benchmark `oocid knn`'s streaming top-k over a bank on disk against the whole bank in memory:
(a) torch matmul + topk, (b) faiss IndexFlatIP (optional: `pip install oocid[bench]`).

For each N (rows), Q random unit queries (seeded, float32) and k neighbours by cosine similarity:
    oocid   retrieval.topk_indexed(queries, retrieval.bank_chunks([bank]), k): what `oocid knn
            --bank` and `oocid knn --query` run once the query features are extracted. The bank
            is read from disk chunk by chunk (pread), scored in blocks (knn.topk_streaming).
            The CLI itself needs a checkpoint and the bank's training shards (N samples), so the
            benchmark calls the function the CLI calls, on a bare random bank.
    torch   the bank read into one (N, D) tensor, then per block of queries (the block's score
            matrix at most 2^28 floats = 1 GiB): (q @ bank^T).topk(k).
    faiss   the bank read into an IndexFlatIP (its storage reserved once, so the rows are held
            once), then index.search(queries, k). Null columns when faiss is not installed.
Times: the search only for torch and faiss (loading the bank is reported apart as load s);
for oocid the whole call, disk reads included. Each method runs in its own subprocess, so the
peak RSS (ru_maxrss) is its own; torch's import alone is about 0.5 GB of it (CUDA build).
Agreement with oocid, per query: the top-k index SETS equal ("sets"; ties in the float scores
may permute ranks), the sorted lists equal ("exact"), and the sorted scores equal within 1e-6
("scores": a set that differs only among equal or 1-ulp scores still counts).

Banks are created once under --workdir (random unit rows, oocid.bank.create.create_store) and reused.

Usage:
    nice -n 5 python tools/bench_knn.py                 # N in 1e5, 1e6, 1e7; Q 10,000; k 200
    python tools/bench_knn.py --rows 1000000            # one N
Prints an environment line, a table and notes; the LAST line is a JSON list with one object per
N. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_ROWS = (100_000, 1_000_000, 10_000_000)
METHODS = ("oocid", "torch", "faiss")
MAX_SCORES = 1 << 28  # floats in the in-memory torch reference's score matrix per query block


def log(msg: str) -> None:
    print(f"[bench_knn {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# ---- banks and queries --------------------------------------------------------------------------


def bank_path(workdir: Path, rows: int, dim: int) -> Path:
    return workdir / f"bank_{rows}x{dim}.npy"


def ensure_bank(workdir: Path, rows: int, dim: int) -> Path:
    """The bank of `rows` random unit rows under workdir: reused (read-only) when it is there
    with the right shape, else created."""
    from oocid.bank.create import create_store
    from oocid.bank.store import open_store

    path = bank_path(workdir, rows, dim)
    workdir.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with open_store(path, read_only=True) as s:
            if (s.n_rows, s.dim, s.meta.dtype) != (rows, dim, "float32"):
                raise SystemExit(f"{path}: is {s.n_rows} x {s.dim} {s.meta.dtype}, not {rows} x {dim} "
                                 "float32; remove it or use another --workdir")
        return path
    log(f"creating {path} ({rows} x {dim} float32, {rows * dim * 4 / 1e9:.2f} GB)")
    t = time.perf_counter()
    create_store(path, rows, dim, seed=0).close()
    log(f"created {path} in {time.perf_counter() - t:.1f} s")
    return path


def make_queries(n: int, dim: int, seed: int) -> Any:
    """(Q, D) float32 random unit rows, the same in every process."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)


def read_bank(path: Path, out: np.ndarray | None = None, step: int = 65536) -> np.ndarray:
    """The whole bank as one (N, D) float32 array (read with pread, block by block)."""
    from oocid.bank.store import open_store

    with open_store(path, read_only=True) as s:
        if out is None:
            out = np.empty((s.n_rows, s.dim), dtype=np.float32)
        for a in range(0, s.n_rows, step):
            out[a:a + step] = s.read_rows(a, min(a + step, s.n_rows))
    return out


# ---- the methods (each in its own child process) ------------------------------------------------


def search(method: str, path: Path, queries: Any, k: int
           ) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """(sims (Q, k), index (Q, k), load s, search s, search CPU s) of one method."""
    import torch

    if method == "oocid":
        from oocid.eval.retrieval import bank_chunks, topk_indexed

        t, c = time.perf_counter(), cpu_s()
        sims, index = topk_indexed(queries, bank_chunks([path], torch.device("cpu")), k)
        return sims.numpy(), index.numpy(), 0.0, time.perf_counter() - t, cpu_s() - c
    if method == "torch":
        t = time.perf_counter()
        bank = torch.from_numpy(read_bank(path))  # (N, D)
        load = time.perf_counter() - t
        t, c = time.perf_counter(), cpu_s()
        block = max(1, MAX_SCORES // bank.shape[0])
        parts = [(qb @ bank.t()).topk(min(k, bank.shape[0]), dim=1) for qb in queries.split(block)]
        sims, index = torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])
        return sims.numpy(), index.numpy(), load, time.perf_counter() - t, cpu_s() - c
    if method == "faiss":
        import faiss

        from oocid.bank.store import open_store

        t = time.perf_counter()
        with open_store(path, read_only=True) as s:
            n, dim = s.n_rows, s.dim
            index_ip = faiss.IndexFlatIP(dim)
            index_ip.codes.resize(n * dim * 4)  # reserve once: adding blocks never reallocates
            index_ip.codes.resize(0)
            for a in range(0, n, 65536):
                index_ip.add(s.read_rows(a, min(a + 65536, n)))
        load = time.perf_counter() - t
        t, c = time.perf_counter(), cpu_s()
        sims_f, index_f = index_ip.search(queries.numpy(), k)
        return sims_f, index_f, load, time.perf_counter() - t, cpu_s() - c
    raise ValueError(method)


def run_child(method: str, rows: int, a: argparse.Namespace) -> dict[str, Any]:
    """One method on one bank; its neighbours go to a .npz in the workdir."""
    import torch

    torch.set_num_threads(a.threads)
    if method == "faiss":
        import faiss

        faiss.omp_set_num_threads(a.threads)
    path = bank_path(Path(a.workdir), rows, a.dim)
    queries = make_queries(a.queries, a.dim, a.seed)
    sims, index, load, secs, cpu = search(method, path, queries, a.k)
    out = result_path(Path(a.workdir), method, rows)
    np.savez(out, sims=sims.astype(np.float32), index=index.astype(np.int64))
    return {"method": method, "rows": rows, "seconds": secs, "cpu_s": cpu, "load_s": load,
            "peak_rss_mb": peak_rss_mb(), "result": str(out)}


def result_path(workdir: Path, method: str, rows: int) -> Path:
    return workdir / f"knn_{method}_{rows}.npz"


def spawn(method: str, rows: int, a: argparse.Namespace) -> dict[str, Any]:
    if a.in_process:
        return run_child(method, rows, a)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--rows", str(rows),
           "--queries", str(a.queries), "--k", str(a.k), "--dim", str(a.dim), "--workdir", a.workdir,
           "--threads", str(a.threads), "--seed", str(a.seed)]
    log(f"run {method} N={rows}")
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        log(f"  {method} N={rows} failed with exit code {p.returncode}")
        return {"method": method, "rows": rows, "error": f"exit code {p.returncode}"}
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    log(f"  {out['seconds']:.1f} s, CPU {out['cpu_s']:.1f} s (load {out['load_s']:.1f} s), "
        f"peak RSS {out['peak_rss_mb']:.0f} MB")
    return out


# ---- agreement -----------------------------------------------------------------------------------


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tol: float = 1e-6) -> dict[str, float]:
    """Fractions of queries whose top-k agree between two results (sims, index (Q, k) sorted
    by decreasing similarity): "sets" same index set; "exact" same ranked list; "ties" same set,
    or bitwise the same sorted scores (the sets then differ only among rows whose score equals
    the k-th: an exact tie either may keep); "scores" sorted scores equal within tol."""
    if a["index"].shape != b["index"].shape:
        return {"sets": 0.0, "exact": 0.0, "ties": 0.0, "scores": 0.0}
    sets = (np.sort(a["index"], axis=1) == np.sort(b["index"], axis=1)).all(axis=1)
    exact = (a["index"] == b["index"]).all(axis=1)
    ties = sets | (a["sims"] == b["sims"]).all(axis=1)
    scores = (np.abs(a["sims"] - b["sims"]) <= tol).all(axis=1)
    return {"sets": float(sets.mean()), "exact": float(exact.mean()), "ties": float(ties.mean()),
            "scores": float(scores.mean())}


def measure(rows: int, a: argparse.Namespace, methods: list[str]) -> dict[str, Any]:
    """All methods on one N, and their agreement with oocid."""
    path = ensure_bank(Path(a.workdir), rows, a.dim)
    res: dict[str, Any] = {"rows": rows, "queries": a.queries, "k": a.k, "bank": str(path)}
    runs = {m: spawn(m, rows, a) for m in methods}
    loaded: dict[str, dict[str, np.ndarray]] = {}
    for m, r in runs.items():
        if "error" in r:
            res[f"{m}_error"] = r["error"]
            continue
        res[f"{m}_s"], res[f"{m}_cpu_s"], res[f"{m}_load_s"] = r["seconds"], r["cpu_s"], r["load_s"]
        res[f"{m}_peak_rss_mb"] = r["peak_rss_mb"]
        with np.load(r["result"]) as z:
            loaded[m] = {"sims": z["sims"], "index": z["index"]}
        if not a.keep:
            Path(r["result"]).unlink()
    res["peak_rss_mb"] = res.get("oocid_peak_rss_mb")
    for m in ("torch", "faiss"):
        res.setdefault(f"{m}_s", None)
        agree = agreement(loaded["oocid"], loaded[m]) if "oocid" in loaded and m in loaded else None
        res[f"topk_agreement_{m}"] = None if agree is None else agree["sets"]
        res[f"topk_exact_{m}"] = None if agree is None else agree["exact"]
        res[f"topk_ties_{m}"] = None if agree is None else agree["ties"]
        res[f"topk_scores_{m}"] = None if agree is None else agree["scores"]
    known = [v for v in (res["topk_agreement_torch"], res["topk_agreement_faiss"]) if v is not None]
    res["topk_agreement"] = min(known) if known else None
    res["oocid_vs_faiss"] = (res["oocid_s"] / res["faiss_s"]
                             if res.get("oocid_s") and res.get("faiss_s") else None)
    res["oocid_vs_faiss_cpu"] = (res["oocid_cpu_s"] / res["faiss_cpu_s"]
                                 if res.get("oocid_cpu_s") and res.get("faiss_cpu_s") else None)
    return res


# ---- the table -----------------------------------------------------------------------------------


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


COLUMNS = (  # header, key, format
    ("rows", "rows", ",d"), ("oocid s", "oocid_s", ".1f"), ("torch s", "torch_s", ".1f"),
    ("faiss s", "faiss_s", ".1f"), ("oocid/faiss", "oocid_vs_faiss", ".2f"),
    ("CPU s oocid", "oocid_cpu_s", ".1f"), ("faiss", "faiss_cpu_s", ".1f"),
    ("RSS MB oocid", "oocid_peak_rss_mb", ".0f"), ("torch", "torch_peak_rss_mb", ".0f"),
    ("faiss", "faiss_peak_rss_mb", ".0f"),
    ("sets=torch", "topk_agreement_torch", ".4f"), ("ties=torch", "topk_ties_torch", ".4f"),
    ("sets=faiss", "topk_agreement_faiss", ".4f"), ("scores=faiss", "topk_scores_faiss", ".4f"),
)


def report(results: list[dict[str, Any]], env: str, faiss_note: str) -> None:
    widths = [max(len(h), 8) for h, _, _ in COLUMNS]
    head = " ".join(f"{h:>{w}}" for (h, _, _), w in zip(COLUMNS, widths, strict=True))
    print(env)
    print(head)
    print("-" * len(head))
    for r in results:
        cells = (_f(r.get(key), fmt) for _, key, fmt in COLUMNS)
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
        for m in METHODS:
            if f"{m}_error" in r:
                print(f"    {m} failed: {r[m + '_error']}")
    print("oocid s: the whole streaming call, disk reads included; torch s / faiss s: the search alone\n"
          "  (load s in the JSON). CPU s: user + system seconds of that call (all threads).\n"
          "RSS MB: peak ru_maxrss of each method's own process (importing torch alone: ~0.5 GB).\n"
          "sets: fraction of queries whose top-k index set equals oocid's; ties: the same set, or\n"
          "  bitwise the same sorted scores (sets differ only by an exact tie at the k-th score);\n"
          "  scores: sorted top-k scores within 1e-6 of oocid's (faiss's own GEMM rounds otherwise)."
          + (f"\n{faiss_note}" if faiss_note else ""))
    print(json.dumps(results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, action="append",
                   help="bank rows N (repeatable; default 1e5, 1e6, 1e7)")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--workdir", default="/tmp/oocid-bench", help="banks are created here once and reused")
    p.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the queries")
    p.add_argument("--method", action="append", choices=METHODS, help="repeatable; default all")
    p.add_argument("--in-process", action="store_true",
                   help="run the methods in this process (fast; peak RSS is then not per method)")
    p.add_argument("--keep", action="store_true",
                   help="keep each method's neighbours (knn_<method>_<N>.npz in the workdir)")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(run_child(a.child, a.rows[0], a)))
        return 0
    import torch

    methods = a.method or list(METHODS)
    if "oocid" not in methods:
        p.error("--method: oocid is the method measured; include it")
    faiss_note = ""
    if "faiss" in methods and not have_faiss():
        methods.remove("faiss")
        faiss_note = "faiss is not installed (pip install 'oocid[bench]'): its columns are null."
        log(faiss_note)
    fv = __import__("faiss").__version__ if "faiss" in methods else "-"
    env = (f"env: torch {torch.__version__}, faiss {fv}, numpy {np.__version__}, python "
           f"{sys.version.split()[0]}, cpu_count {os.cpu_count()}, threads {a.threads}; Q {a.queries}, "
           f"k {a.k}, D {a.dim}, float32, .npy bank")
    log(env)
    results = [measure(rows, a, methods) for rows in (a.rows or list(DEFAULT_ROWS))]
    report(results, env, faiss_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
