"""How a command ends when it fails: one line on stderr and a documented exit code.

Under torchrun every process runs the command, so a bad argument would print the same line once
per process, above torchrun's failure summary that says only "To enable traceback see ...". So
each process writes its line to the error file torchrun hands it (`TORCHELASTIC_ERROR_FILE`),
which the summary shows for that rank, and only each machine's first process prints it too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import NoReturn

INTERRUPTED = "interrupted"  # what a command without a word of its own says on Ctrl-C
TRAIN_INTERRUPTED = ("interrupted; the bank and the last checkpoint are intact (a run continues "
                     "with --resume)")
_interrupted = [INTERRUPTED]  # the line for Ctrl-C: set by the command that runs


def on_interrupt(msg: str) -> None:
    """Set what Ctrl-C says from here on (the running command's own words)."""
    _interrupted[0] = msg


def interrupted() -> str:
    return _interrupted[0]


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
    line = f"oocid: {msg}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
    recorded = bool(error_file) and _to_error_file(error_file, line)
    if not recorded or os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=sys.stderr)
    sys.exit(code)
