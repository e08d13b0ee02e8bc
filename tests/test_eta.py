"""The run's duration, estimated early and once more if a longer measurement disagrees
(oocid.progress.Eta), on a fake clock."""

from __future__ import annotations

from oocid.progress import Eta, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _run(first: int, last: int, seconds_a_step: list[float] | float) -> tuple[list[str], list[int]]:
    """(what was said, the step after which each line came) over steps first+1..last."""
    clock, said, when = Clock(), [], []
    eta = Eta(first, last, said.append, clock=clock)
    for k, step in enumerate(range(first + 1, last + 1)):
        clock.now += seconds_a_step if isinstance(seconds_a_step, float) else seconds_a_step[k]
        n = len(said)
        eta.tick(step)
        when += [step] * (len(said) - n)
    return said, when


def test_fast_steps_are_estimated_after_a_few_steps() -> None:
    said, when = _run(10, 110, 0.5)  # a resumed run: steps 11..110
    assert when == [16]  # step 11 not timed, then 12..16; steady: nothing more to say
    assert said == ["oocid: about 47 s for the 94 steps left (500 ms a step)"]


def test_slow_steps_are_estimated_after_seconds() -> None:
    """The ImageNet recipe on 2 CPU cores: 17.7 s a step; said after the second step (under
    a minute in), not after the 23rd (about 7 minutes) as before."""
    said, when = _run(0, 800, 17.7)
    assert when == [2] and said[0].startswith("oocid: about 3.9 h for the 798 steps left")


def test_said_again_when_the_longer_measurement_disagrees() -> None:
    steps = [1.0] * 6 + [3.0] * 40  # steps 2-6 fast, then three times slower
    said, when = _run(0, 46, steps)
    assert when == [6, 21] and "(1000 ms a step)" in said[0]
    assert said[1] == ("oocid: about 62 s for the 25 steps left (2500 ms a step, measured "
                       "over 20 steps)")


def test_short_runs_say_nothing_past_their_end() -> None:
    said, _ = _run(0, 6, 0.5)  # the first estimate would come at step 6, with no step left
    assert said == []
    said, _ = _run(0, 7, 0.5)
    assert said == ["oocid: about 0 s for the 1 step left (500 ms a step)"]


def test_duration_units() -> None:
    assert (duration(59), duration(600), duration(3 * 3600)) == ("59 s", "10 min", "3.0 h")
