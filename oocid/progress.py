"""Progress output that suits where it goes: the one place every command makes a progress bar.

On a terminal, a live tqdm bar on stderr. Anywhere else (a pipe, a log file, a CI job) bar frames
would be noise (carriage returns, partial lines): instead a plain line `oocid: DESC n/total
(p%)` about every tenth of a long total, but not within 5 s of the last line (a total done in
seconds says nothing on the way), and at least every 30 s, plus one at the end of a bar that
tqdm would leave on screen (the training loop prints its own line per epoch).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

PLAIN_EVERY_S = 30.0  # longest gap between two plain progress lines
PLAIN_MIN_GAP_S = 5.0  # shortest gap before a tenth-of-the-total line
PLAIN_STEPS = 10  # plain lines over a long total (one about every 10 %)
PLAIN_MIN_TOTAL = 2 * PLAIN_STEPS  # shorter totals: lines by time only


class Progress(Protocol):
    """What callers use of a bar: tqdm's names, so a tqdm bar is one."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **kwargs: Any) -> Any: ...

    def close(self) -> Any: ...

    def __enter__(self) -> Progress: ...

    def __exit__(self, *exc: object) -> Any: ...


class PlainProgress:
    """Progress as plain lines for a stream that is no terminal (see the module docstring)."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0,
                 leave: bool = True, file: IO[str] | None = None,
                 every_s: float = PLAIN_EVERY_S, min_gap_s: float = PLAIN_MIN_GAP_S) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.leave, self.file, self.every_s, self.min_gap_s = leave, file, every_s, min_gap_s
        self.postfix = ""
        self.step = -(-total // PLAIN_STEPS) if total and total >= PLAIN_MIN_TOTAL else None
        self.next_n = initial + self.step if self.step else None
        self.last_t = time.monotonic()
        self.closed = False

    def _line(self) -> None:
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        post = f" {self.postfix}" if self.postfix else ""
        print(f"oocid: {self.desc} {done}{pct}{post}", file=self.file or sys.stderr, flush=True)
        self.last_t = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        due_n = self.next_n is not None and self.n >= self.next_n
        gap = time.monotonic() - self.last_t
        if (due_n and (self.total is None or self.n < self.total) and gap >= self.min_gap_s) \
                or gap >= self.every_s:
            self._line()
        if self.step is not None:  # a tenth passed within the gap is not said later
            while self.next_n is not None and self.next_n <= self.n:
                self.next_n += self.step

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.leave and self.n > 0:
                self._line()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Off:
    """No progress output at all (progress turned off)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def is_terminal(stream: IO[str] | None = None) -> bool:
    s = stream if stream is not None else sys.stderr
    try:
        return bool(s.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(total: int | None, desc: str, unit: str = "it", *, enabled: bool = True,
                 initial: int = 0, leave: bool = True, plain: bool = True) -> Progress:
    """A live tqdm bar on stderr when it is a terminal; plain lines otherwise (`plain`; with
    plain=False, nothing: for short inner bars whose plain lines would only repeat the outer
    ones); nothing when not `enabled`."""
    if not enabled:
        return _Off()
    if is_terminal(sys.stderr):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,  # type: ignore[no-any-return]
                    file=sys.stderr)
    return PlainProgress(total, desc, unit, initial, leave) if plain else _Off()


class Eta:
    """Says early how long the rest of this run's steps take, and once more if a longer
    measurement disagrees: a user needs the estimate before committing hours, not after the
    first epochs.

    The first step is not timed (it starts the DataLoader workers and allocates the step's
    buffers). The first estimate comes once FIRST_STEPS steps or FIRST_S seconds after it
    have been timed, whichever comes first (a step of many seconds is estimated from one or
    two); a second one after MEASURE timed steps, if it differs from the first by more than
    a quarter. What happens between steps in that window (an epoch's end, a checkpoint) is
    counted with them; a final evaluation comes on top. `clock`: seconds, for tests."""

    WARMUP = 1  # steps not timed
    FIRST_STEPS, FIRST_S = 5, 10.0  # the first estimate: after this many steps or seconds
    MEASURE = 20  # timed steps of the firmer estimate
    AGAIN = 0.25  # relative difference that makes it worth saying

    def __init__(self, first_step: int, last_step: int, say: Callable[[str], None],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.first, self.last, self.say, self.clock = first_step, last_step, say, clock
        self.t: float | None = None
        self.per: float | None = None  # seconds a step, as said first

    def tick(self, step: int) -> None:
        done = step - self.first
        if done == self.WARMUP:
            self.t = self.clock()
            return
        if self.t is None or done < self.WARMUP or done > self.WARMUP + self.MEASURE:
            return
        timed = done - self.WARMUP
        elapsed = self.clock() - self.t
        per = elapsed / timed
        if self.per is None and (timed >= self.FIRST_STEPS or elapsed >= self.FIRST_S):
            self.per = per
            self._say(step, per, "")
        elif self.per is not None and timed == self.MEASURE \
                and abs(per - self.per) > self.AGAIN * self.per:
            self._say(step, per, f", measured over {timed} steps")

    def _say(self, step: int, per: float, how: str) -> None:
        left = self.last - step
        if left > 0:
            self.say(f"oocid: about {duration(per * left)} for the {left} step{'s' * (left != 1)} left "
                     f"({per * 1e3:.0f} ms a step{how})")


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def chunk_bar(total: int, desc: str, on: bool) -> Progress:
    """A progress bar over a bank's chunks (none unless `on`)."""
    return progress_bar(total, desc, "chunk", enabled=on)
