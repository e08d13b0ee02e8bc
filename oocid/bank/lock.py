"""One trainer per bank: an advisory lock file beside the bank.

`bank.zarr.lock` (or `bank.npy.lock`) is locked with flock(2) for the life of the training
process. The kernel releases the lock when the process dies, however it dies, so a lock left by
a killed trainer is stale by construction and the next trainer takes it over; the file's text
(pid, host, start time) only serves the error message. The lock file sits beside the bank the
path resolves to, so a bank reached through a symlink (of it or of a folder above it) has one
lock whatever name each trainer uses.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from oocid.bank.rows import _layout
from oocid.errors import InputError


class BankLock:
    def __init__(self, bank: Path) -> None:
        _layout(bank)  # a path that can be no bank is refused before a lock file appears
        real = bank.resolve()  # symlinks followed: one lock per bank, whatever its name
        self.bank = str(bank) if real == bank.absolute() else f"{bank} (= {real})"  # for messages
        self.path = real.with_name(real.name + ".lock")
        self.fd: int | None = None
        self.took_over = False

    def acquire(self) -> BankLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise InputError(f"{self.bank}: is in use by a running trainer "
                             f"({holder}); wait for it to finish or use another --bank") from None
        self.took_over = os.fstat(fd).st_size > 0  # a killed trainer's text was left behind
        text = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> BankLock:
        return self.acquire()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
