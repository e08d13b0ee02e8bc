"""User-facing errors: one line naming the file and the problem, and an exit code.

Every error that bad input can cause is raised as an `OocidError` (or a subclass). The CLI
catches it, prints `oocid: error: <message>` on one line and exits with `exit_code`; no
traceback reaches the user. Exit codes (documented in the README):

    1  verification failed (e.g. `oocid bank verify` found bad rows)
    2  bad input: missing or malformed path, file, config or option
    3  data error: unreadable shard, manifest/bank mismatch
    4  I/O error while writing (disk full, permission)
    5  training diverged (every step of a long run of steps gave non-finite values)
   70  internal error (a bug), printed by the CLI for any other exception
  130  interrupted (Ctrl-C)
  143  stopped by SIGTERM (a job scheduler, torchrun): as Ctrl-C
"""

from __future__ import annotations


class OocidError(Exception):
    """An error whose message is shown to the user as is, on one line."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(OocidError):
    """Bad input: a missing path, a malformed file, an unknown config key."""

    exit_code = 2


class DataError(OocidError):
    """Data that cannot be used: unreadable shard, bank that does not match the manifest."""

    exit_code = 3


class WriteError(OocidError):
    """Writing failed (disk full, permission); what was committed before is intact."""

    exit_code = 4


class VerifyError(OocidError):
    """A verification found problems."""

    exit_code = 1


class DivergedError(OocidError):
    """Training diverged: steps keep giving non-finite features or loss (each one skipped)."""

    exit_code = 5


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its whitespace runs as single spaces), or its type's
    name when it has none: how a skipped image's reason is said."""
    return " ".join(str(e).split()) or type(e).__name__
