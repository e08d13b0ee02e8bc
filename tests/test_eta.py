"""The run's duration, estimated once after its first steps (oocid.progress.Eta)."""

from __future__ import annotations

from oocid.progress import Eta, duration


def test_said_once_after_warmup_and_measured_steps() -> None:
    said: list[str] = []
    eta = Eta(10, 110, said.append)  # a resumed run: steps 11..110
    for step in range(11, 111):
        eta.tick(step)
    assert len(said) == 1 and "for the 77 steps left" in said[0] and "ms a step" in said[0]


def test_short_runs_say_nothing() -> None:
    said: list[str] = []
    eta = Eta(0, 23, said.append)
    for step in range(1, 24):
        eta.tick(step)
    assert said == []


def test_duration_units() -> None:
    assert (duration(59), duration(600), duration(3 * 3600)) == ("59 s", "10 min", "3.0 h")
