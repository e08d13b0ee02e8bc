"""NCE's Z (`ZEstimator`) kept on the device: the numbers of the host-side average it replaced,
step by step and bit for bit; nothing read back to the host in a step; checkpoints of plain
floats, old ones included."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_device_reads_on_check_steps, tiny_config, tiny_nce_step
from torch import Tensor

from oocid.data.batch import Batch
from oocid.distributed.sync import DistSync
from oocid.distributed.world import World
from oocid.method.npid import StepOut, nce_criterion, nce_probs
from oocid.method.zest import ZEstimator
from oocid.train.watch import CollapseWatch

N = 5000


class OldZ:
    """The estimator as it was: each estimate read back to a Python float, the moving average
    (and the weighted mean over processes, `others` their summed [estimate x weight, weight])
    kept in Python floats."""

    def __init__(self, mode: str, momentum: float, others: tuple[float, float] | None = None):
        self.mode, self.momentum, self.others = mode, momentum, others
        self.value: float | None = None
        self.first: float | None = None

    def agree(self, est: float, weight: float) -> float:
        if self.others is None:
            return est
        s, w = est * weight + self.others[0], weight + self.others[1]
        return s / w if w > 0 else est

    def update(self, est: float) -> None:
        if self.value is None:
            self.value = est
            self.first = est
        else:
            self.value = self.momentum * self.value + (1.0 - self.momentum) * est

    def idle(self) -> None:
        if self.others is not None and (self.value is None or self.mode == "ema"):
            self.update(self.agree(0.0, 0.0))

    def __call__(self, scores: Tensor, n_data: int, temperature: float) -> Tensor:
        if self.value is None or self.mode == "ema":
            est = float((torch.exp(scores.detach().float() / temperature).mean() * n_data).item())
            self.update(self.agree(est, 1.0))
        assert self.value is not None
        return torch.tensor(self.value, dtype=torch.float32, device=scores.device)

    def drift(self) -> float:
        if self.value is None or not self.first:
            return 1.0
        return self.value / self.first


class OtherRanks:
    """A `World` for `DistSync`: the sum over ranks adds fixed numbers for the other ranks."""

    def __init__(self, others: tuple[float, float]) -> None:
        self.others = others

    def all_sum_tensor(self, t: Tensor) -> Tensor:
        return t + torch.tensor(self.others, dtype=t.dtype, device=t.device)


def batches(seed: int, steps: int) -> Iterator[Tensor]:
    """Scores (B, K+1) of unit vectors, of a few batch sizes (the last batch of an epoch)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        b = (16, 16, 7)[i % 3]
        yield (2 * torch.rand(b, 33, generator=g) - 1) * (1 - 0.3 * torch.rand(1, generator=g))


@pytest.mark.parametrize("mode", ["ema", "oneshot"])
@pytest.mark.parametrize("momentum", [0.99, 0.9, 0.5])
@pytest.mark.parametrize("temperature", [0.07, 0.1])
@pytest.mark.parametrize("others", [None, (7_000.0, 1.0), (12_000.0, 3.0)])
def test_z_and_the_nce_loss_equal_the_host_side_average_bit_for_bit(
        mode: str, momentum: float, temperature: float, others: tuple[float, float] | None) -> None:
    old = OldZ(mode, momentum, others)
    new = ZEstimator(mode, momentum)  # type: ignore[arg-type]
    if others is not None:  # several processes: DistSync's weighted mean
        new.agree = DistSync(OtherRanks(others), torch.device("cpu")).agree_z  # type: ignore[arg-type]
    for i, scores in enumerate(batches(seed=int(100 * momentum + temperature * 1000), steps=40)):
        if others is not None and i % 7 == 6:  # an idle step: weight 0, the others' mean
            old.idle()
            new.idle()
            assert new.value == old.value
            continue
        z_old, z_new = old(scores, N, temperature), new(scores, N, temperature)
        assert z_new.dtype == torch.float32 and torch.equal(z_new, z_old), i
        assert new.value == old.value and new.first == old.first, i
        assert new.drift() == old.drift(), i
        loss_old = nce_criterion(nce_probs(scores, N, temperature, z_old)[0], N)
        loss_new = nce_criterion(nce_probs(scores, N, temperature, z_new)[0], N)
        assert torch.equal(loss_new, loss_old), i
    assert mode == "oneshot" or new.value != new.first  # it moved


def test_an_idle_process_with_no_batch_yet_takes_the_others_mean() -> None:
    z = ZEstimator("ema", 0.9, agree=DistSync(OtherRanks((300.0, 2.0)),  # type: ignore[arg-type]
                                              torch.device("cpu")).agree_z)
    z.idle()
    assert z.value == 150.0 and z.first == 150.0
    alone = ZEstimator("ema", 0.9, agree=DistSync(World(), torch.device("cpu")).agree_z)
    alone.idle()  # every process idle: its own (zero) estimate, as before
    assert alone.value == 0.0 and alone.drift() == 1.0


READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu")


def no_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way of reading a tensor back to the host raises (on a GPU each is a sync)."""
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("read back to the host")

    for name in READS:
        monkeypatch.setattr(Tensor, name, refuse)
    monkeypatch.setattr(torch, "tensor", refuse)  # a host -> device copy (a sync on a GPU)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_step_reads_nothing_back_to_the_host(monkeypatch: pytest.MonkeyPatch,
                                               device: str) -> None:
    """The old estimator called .item() for every ema batch; a meta tensor stands for a
    GPU's (it has no value to read back)."""
    scores = [s.to(device) for s in batches(seed=3, steps=6)]
    zs = [ZEstimator("ema", 0.9), ZEstimator("oneshot"),
          ZEstimator("ema", 0.9, agree=DistSync(World(), torch.device(device)).agree_z)]
    with monkeypatch.context() as m:
        no_reads(m)
        for z in zs:
            for s in scores:
                out = z(s, N, 0.07)
                saved = z.snapshot()
                z(s, N, 0.07)
                z.restore(saved)  # a skipped step's undo
                z.idle()  # (with agree: weight 0 alone, so its own estimate 0)
            assert out.device.type == device and z.z is not None and z.drift_tensor() is not None


def test_an_nce_ema_step_reads_back_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole step: one read (the finite check's), Z never (it was read every step)."""
    step, zest, store = tiny_nce_step(tmp_path / "b.npy")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 16, 16, generator=g)
    step(Batch(x, torch.arange(16), torch.zeros(16)), 0, 0.03)
    reads: list[str] = []
    for name in ("item", "__float__", "tolist"):
        real = getattr(Tensor, name)
        monkeypatch.setattr(Tensor, name, lambda t, name=name, real=real:
                            reads.append(name) or real(t))
    outs = [step(Batch(x, torch.arange(16 * i, 16 * i + 16), torch.zeros(16)), i, 0.03)
            for i in (1, 2, 3)]
    monkeypatch.undo()
    assert reads == ["tolist"] * 3
    assert all(isinstance(o.z, Tensor) for o in outs)
    assert outs[-1].z is not None and float(outs[-1].z) == zest.value and zest.value != zest.first
    store.close()


def test_state_dict_holds_plain_floats_and_a_checkpoint_of_the_old_code_loads() -> None:
    scores = list(batches(seed=5, steps=8))
    # what the old code saved after 4 batches, and what it went on to compute
    old = OldZ("ema", 0.9)
    for s in scores[:4]:
        old(s, N, 0.1)
    saved = {"mode": "ema", "momentum": 0.9, "value": old.value, "first": old.first}
    new = ZEstimator("ema")
    new.load_state_dict(saved)
    assert new.state_dict() == saved
    for s in scores[4:]:
        assert torch.equal(new(s, N, 0.1), old(s, N, 0.1))
    state = new.state_dict()
    assert state == {"mode": "ema", "momentum": 0.9, "value": old.value, "first": old.first}
    assert all(type(state[k]) is float for k in ("momentum", "value", "first"))
    again = ZEstimator("ema")
    again.load_state_dict(torch.load(_save(state), weights_only=True))
    assert again.state_dict() == state
    fresh = ZEstimator("oneshot")
    fresh.load_state_dict({"mode": "oneshot", "momentum": 0.99, "value": None, "first": None})
    assert fresh.z is None and fresh.state_dict()["value"] is None and fresh.drift() == 1.0


def _save(state: dict[str, Any]) -> Any:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


class ZStep:
    def __init__(self, zest: ZEstimator) -> None:
        self.zest = zest
        self.last_features = None


def test_the_watch_reads_z_back_from_a_device_only_every_n_steps() -> None:
    """As the features' check: Z on a meta tensor (a GPU's) is read only at the first step and
    every CHECK_EVERY."""
    zest = ZEstimator("ema")
    zest(torch.zeros(4, 5, device="meta"), N, 0.1)
    assert_device_reads_on_check_steps(CollapseWatch(tiny_config(kind="nce"), lambda m: None),
                                       ZStep(zest))


@pytest.mark.parametrize(("value", "fires"), [(150.0, True), (1.0 / 200, True), (50.0, False)])
def test_the_watch_warns_when_z_drifts(value: float, fires: bool) -> None:
    said: list[str] = []
    zest = ZEstimator("ema")
    zest.load_state_dict({"mode": "ema", "momentum": 0.99, "value": value, "first": 1.0})
    w = CollapseWatch(tiny_config(kind="nce"), said.append)
    w.check(1, StepOut(5.0, False), ZStep(zest))  # type: ignore[arg-type]
    assert (w.fired == {"z"}) is fires and len(said) == int(fires)
    assert not fires or f"drifted {value:.3g}x" in said[0]
    assert math.isclose(zest.drift(), value)
