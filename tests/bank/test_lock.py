"""Two trainers on one bank: the second refuses; a killed trainer's lock is taken over."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oocid.bank.lock import BankLock
from oocid.errors import InputError

HOLD = """
import sys, time
from pathlib import Path
from oocid.bank.lock import BankLock
lock = BankLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_holder_refused_with_pid(tmp_path: Path) -> None:
    bank = tmp_path / "bank.zarr"
    with BankLock(bank), pytest.raises(InputError, match=rf"in use by a running trainer \(pid {os.getpid()}"):
        BankLock(bank).acquire()
    with BankLock(bank) as again:  # released: free again, and not a takeover
        assert not again.took_over


def test_lock_of_killed_process_is_taken_over(tmp_path: Path) -> None:
    bank = tmp_path / "bank.npy"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(bank)], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == b"locked"
    with pytest.raises(InputError, match=f"pid {p.pid}"):
        BankLock(bank).acquire()
    p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(0.05)
    with BankLock(bank) as lock:
        assert lock.took_over


def test_a_bank_reached_through_a_symlink_has_one_lock(tmp_path: Path) -> None:
    """Two names of one bank (a symlink to it, a symlink to its folder) take the same lock,
    beside the real bank; the message names the path used and the bank it resolves to."""
    tmp_path = tmp_path.resolve()  # no symlink above the test's own folder
    real = tmp_path / "data" / "bank.zarr"
    real.mkdir(parents=True)
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    folder = tmp_path / "folder"
    folder.symlink_to(tmp_path / "data")
    for other in (link, folder / "bank.zarr"):
        with BankLock(real) as held:
            assert held.path == real.with_name("bank.zarr.lock")
            said = re.escape(f"{other} (= {real}): is in use by a running trainer (pid {os.getpid()}")
            with pytest.raises(InputError, match="^" + said):
                BankLock(other).acquire()
        with BankLock(other) as lock, \
                pytest.raises(InputError, match=f"^{re.escape(str(real))}: is in use"):
            assert lock.path == held.path
            BankLock(real).acquire()
    assert not (tmp_path / "link.zarr.lock").exists()
