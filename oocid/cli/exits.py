"""How a command ends when it fails: one line on stderr and a documented exit code.

Under torchrun every process runs the command, so a bad argument would print the same line once
per process, above torchrun's failure summary that says only "To enable traceback see ...". So
each process writes its line to the error file torchrun hands it (`TORCHELASTIC_ERROR_FILE`),
which the summary shows for that rank, and only each machine's first process prints it too.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import NoReturn

INTERRUPTED = "interrupted"  # what a command without a word of its own says on Ctrl-C
TRAIN_INTERRUPTED = ("interrupted; the bank and the last checkpoint are intact (a run continues "
                     "with --resume)")
_interrupted = [INTERRUPTED]  # the line for Ctrl-C: set by the command that runs
_terminated = [False]  # a SIGTERM arrived: the interrupt exits 143, not 130


def on_interrupt(msg: str) -> None:
    """Set what Ctrl-C says from here on (the running command's own words)."""
    _interrupted[0] = msg


def interrupted() -> str:
    """The running command's interrupt line; under torchrun after a SIGTERM, which torchrun
    sends every process once one has failed, it says where the cause is named."""
    if _terminated[0] and os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return (f"stopped by SIGTERM (torchrun's summary names the process that failed first, "
                f"if one did); {_interrupted[0]}")
    return _interrupted[0]


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (a job scheduler's stop, torchrun stopping the other processes) takes Ctrl-C's
    path: a KeyboardInterrupt where the command is, so its clean-up runs. Only the first: a
    second one while that clean-up runs is ignored (SIGKILL is the hard stop)."""
    if _terminated[0]:
        return
    _terminated[0] = True
    # A scheduler signals the whole process group: DataLoader workers die of it, and torch's
    # SIGCHLD handler would raise "worker killed by signal" in the clean-up (a traceback on
    # stderr) or instead of the interrupt. Their deaths are expected now.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    raise KeyboardInterrupt


def handle_sigterm() -> None:
    """Make SIGTERM interrupt the command as Ctrl-C does (signals reach the main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def release_sigterm() -> None:
    """The command is over: a SIGTERM from here on ends the process at once, as by default (under
    torchrun, one that fails gets it while it exits), not with a KeyboardInterrupt."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def interrupt_code() -> int:
    """The exit code of an interrupted command: 143 after a SIGTERM (128 + 15), else 130."""
    return 143 if _terminated[0] else 130


def _to_error_file(path: str, line: str) -> bool:
    """torchrun's error file: {"message": str, "timestamp": int} is shown as is in its summary."""
    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    except OSError:
        return False
    return True


def fail(msg: str, code: int) -> NoReturn:
    """Say `msg` in one line and exit with `code` (once per machine under torchrun)."""
    release_sigterm()
    line = f"oocid: {msg}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
    recorded = bool(error_file) and _to_error_file(error_file, line)
    if not recorded or os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=sys.stderr)
    sys.exit(code)
