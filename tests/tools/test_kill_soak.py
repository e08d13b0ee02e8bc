"""tools/kill_soak.py at toy size: one big-run variant (a partial cache, so evictions go into
journal parts) on 4,000 rows instead of 600,000, killed once and resumed, must survive every
check and be bit-identical to its uninterrupted twin; the bit-exact comparison must report a
changed bank row and a changed weight."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from helpers import load_tool

from oocid.bank.store import open_store


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, Path, int, dict[str, Any]]:
    tool = load_tool("kill_soak")
    work = tmp_path_factory.mktemp("soak")
    out = work / "out.txt"
    with open(out, "w") as fh, contextlib.redirect_stdout(fh):
        rc = tool.main(["--kills", "1", "--only", "big/npy/partial", "--big-rows", "4000",
                        "--work", str(work), "--keep", "--seed", "1"])
    return tool, work, rc, json.loads(out.read_text().strip().splitlines()[-1])


def test_big_toy_run_survives_its_kill_bit_exact(
        soak: tuple[ModuleType, Path, int, dict[str, Any]]) -> None:
    tool, work, rc, summary = soak
    (res,) = summary["results"]
    assert rc == 0, res["failure"]
    assert summary["survived"] == 1 and summary["bit_exact"] == 1 and summary["big_kills"] == 1
    assert res["variant"] == "big/npy/partial/mem/ck4" and res["landed"]
    assert res["checks"]["bit-exact"] is True
    twin = work / "twin-big-npy-partial-mem-ck4"
    with open_store(twin / "bank.npy", read_only=True) as st:
        assert (st.n_rows, st.chunk_rows, st.meta.committed_step) == (4000, 125, tool.BIG_PARTIAL_STEPS)
    # the partial cache: 16 chunks of the bank's 32
    assert "cache_mb = 0.9765625" in (twin / "cfg.toml").read_text()
    assert len(list((work / "big-4000" / "shards").glob("*.tar"))) == 32


def test_compare_with_twin_reports_a_changed_row_and_weight(
        soak: tuple[ModuleType, Path, int, dict[str, Any]], tmp_path: Path) -> None:
    tool, work, _, _ = soak
    (variant,) = [v for v in tool.variants(4000) if v.name == "big/npy/partial/mem/ck4"]
    twin = tool.Case(work / "twin-big-npy-partial-mem-ck4", work / "big-4000" / "shards", variant)
    copy = tool.Case(tmp_path / "copy", twin.shards, variant)
    shutil.copytree(twin.root, copy.root)
    assert tool.compare_with_twin(copy, twin) == ""

    rows = np.load(copy.bank, mmap_mode="r+")
    rows[1234] = -rows[1234]  # still a unit row: only the comparison can tell
    rows.flush()
    del rows
    assert tool.compare_with_twin(copy, twin) == "1 of 4000 bank rows differ from the twin's"

    shutil.copy(twin.bank, copy.bank)
    ck = tool.ckpt_path(copy.run, tool.BIG_PARTIAL_STEPS)
    state = torch.load(ck, map_location="cpu", weights_only=False)
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name].clone()
    state["model"][name].view(-1)[0] += 0.5
    torch.save(state, ck)
    assert tool.compare_with_twin(copy, twin) == f"model weights differ from the twin's: {name}"
