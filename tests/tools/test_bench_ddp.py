"""tools/bench_ddp.py at toy size: one process and two (torchrun) train, collectives are
counted, and the last line is JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import TOOLS


def test_bench_ddp_toy() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OOCID_DEBUG"}
    p = subprocess.run([sys.executable, str(TOOLS / "bench_ddp.py"), "--toy"], env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("variant")
    out = json.loads(lines[-1])
    one, two = out["runs"]
    assert one["world"] == 1 and two["world"] == 2 and two["global_batch"] == one["global_batch"]
    assert one["steps"] == two["steps"]  # the same global batch: the same number of steps
    assert "grad_bytes_per_step" not in one
    # the small net's gradients, all-reduced each step: its parameters x 4 bytes
    from oocid.models import build_model

    params = sum(p.numel() for p in build_model("small", 1, 128).parameters())
    assert two["grad_bytes_per_step"] == params * 4
    assert two["small_calls_per_step"] >= 2  # the loss weight and the finite check
    assert out["allgather_negatives_ms"] > 0
