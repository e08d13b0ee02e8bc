"""Atomic, self-sufficient checkpoints and their pairing with the bank's committed step.

A checkpoint holds the model, optimiser, Z, step, epoch, RNG states and the full resolved
config, so a run can be rebuilt from it alone. Files are `ckpt-<step>.pt` in the run folder,
written to a temporary name, fsynced and renamed; `last.pt` is a hard link to the newest.

Commit order at a checkpoint (what makes a kill at any moment safe):
  1. write `ckpt-<step>.pt` atomically (the previous checkpoint is kept);
  2. commit the bank with `step` (the store's journal rename is the commit point);
  3. point `last.pt` at the new file and delete older checkpoints.
On resume the bank's committed step names the checkpoint to load: a kill before 2 leaves the
bank at the previous step, whose checkpoint still exists; a kill after 2 leaves both new.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import DataError, InputError, WriteError

CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to `path` via a temporary file, fsync and rename; WriteError on failure
    (the file previously at `path`, if any, is untouched)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        reason = "disk full" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else e.strerror
        raise WriteError(f"{path}: could not write checkpoint: {reason}") from None


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"ckpt-{step:09d}.pt"


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = CKPT_RE.match(p.name)
            if m:
                out[int(m.group(1))] = p
    return out


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Phase 1: write ckpt-<step>.pt atomically. Returns its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(run_dir, step)
    atomic_torch_save(state, path)
    return path


def finish_checkpoint(run_dir: Path, step: int) -> None:
    """Phase 3 (after the bank committed `step`): last.pt -> ckpt-<step>.pt, drop older ones."""
    path = checkpoint_path(run_dir, step)
    last = run_dir / "last.pt"
    tmp = run_dir / "last.pt.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)
        os.replace(tmp, last)
        fsync_dir(run_dir)
    except OSError as e:
        raise WriteError(f"{last}: could not update: {e.strerror}") from None
    for s, p in list_checkpoints(run_dir).items():
        if s != step:
            p.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file (CPU tensors); InputError/DataError with the path on failure."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable oocid checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != "oocid-checkpoint":
        raise DataError(f"{path}: not an oocid checkpoint")
    return state


def checkpoint_for_step(run_dir: Path, step: int) -> Path:
    """The checkpoint that pairs with a bank committed at `step`."""
    found = list_checkpoints(run_dir)
    if step in found:
        return found[step]
    have = ", ".join(str(s) for s in sorted(found)) or "none"
    raise DataError(f"{run_dir}: no checkpoint for the bank's committed step {step} "
                    f"(checkpoints at steps: {have})")
