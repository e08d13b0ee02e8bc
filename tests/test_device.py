"""Device and precision resolution, checked on the CPU with torch.cuda's queries faked."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import torch

from oocid.bank.io_thread import IOThread
from oocid.bank.store import BankStore
from oocid.config import Config
from oocid.device import resolve_precision, use_device


@pytest.mark.parametrize(("native", "want"), [(True, "bf16"), (False, "16")])
def test_auto_precision_ignores_emulated_bf16(monkeypatch: pytest.MonkeyPatch, native: bool,
                                              want: str) -> None:
    # a V100 or T4 reports bf16 "supported" by emulation only; auto must pick fp16 there
    def fake(including_emulation: bool = True) -> bool:
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake)
    cuda = torch.device("cuda:0")
    assert resolve_precision("auto", cuda) == want
    assert resolve_precision("32", cuda) == "32"
    assert resolve_precision("auto", torch.device("cpu")) == "32"


def test_use_device_sets_cuda_n_current_and_autotunes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    use_device(torch.device("cpu"))
    assert calls == [] and torch.backends.cudnn.benchmark is False
    use_device(torch.device("cuda"))  # no index: the current device stays
    assert calls == [] and torch.backends.cudnn.benchmark is True
    use_device(torch.device("cuda:1"))
    assert calls == [torch.device("cuda:1")]


def test_io_thread_sets_its_own_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache's I/O thread pins host buffers; a new thread's current device is GPU 0, so it
    makes the run's device current itself."""
    calls: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda d: calls.append((threading.current_thread().name, d)))
    store = cast(BankStore, object())  # no job runs: the store is never touched
    io = IOThread(store, torch.device("cuda:1"))
    io.stop()
    assert io.pin and calls == [("oocid-bank-io", torch.device("cuda:1"))]
    calls.clear()
    io = IOThread(store, None)
    io.stop()
    assert not io.pin and calls == []


class _Stop(Exception):
    pass


def test_train_makes_its_device_current(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from oocid.train import loop

    seen: list[torch.device] = []

    def stop(*args: object, **kwargs: object) -> None:
        raise _Stop

    monkeypatch.setattr(loop, "read_manifest", lambda path: SimpleNamespace(n=10))
    monkeypatch.setattr(loop, "resolve_device", lambda name: torch.device("cuda:1"))
    monkeypatch.setattr(loop, "use_device", seen.append)
    monkeypatch.setattr(loop, "cache_budget_rows", stop)  # the next thing train() does
    with pytest.raises(_Stop):
        loop.train(Config(), tmp_path / "shards", tmp_path / "bank", tmp_path / "run",
                   progress=False, log=lambda m: None)
    assert seen == [torch.device("cuda:1")]
