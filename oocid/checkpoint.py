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
An epoch's line in `metrics.jsonl` is appended after its checkpoint; the epoch-end checkpoint
holds that line too, so `repair_metrics` restores it on resume if a kill came in between.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from oocid.atomic import atomic_open, atomic_write, fsync_dir
from oocid.errors import DataError, InputError, WriteError
from oocid.models import Embedder, build_model

CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to `path` all or nothing (`oocid.atomic`); WriteError on failure (the file
    previously at `path`, if any, is untouched).

    The object is serialised in memory first: torch.save writing to a file that hits a full
    disk or the file size limit raises a RuntimeError that hides the errno ("unexpected pos"),
    while a plain write raises the OSError that says what happened."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_open(path, "checkpoint") as f:
        f.write(buf.getbuffer())


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
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass  # an older checkpoint left behind is harmless: the bank names the one to load


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file (CPU tensors); InputError/DataError with the path on failure."""
    path = Path(path)
    if path.is_dir():
        last = path / "last.pt"
        hint = f"; give {last}, the newest checkpoint of that run" if last.is_file() else ""
        raise InputError(f"{path}: is a folder, not a checkpoint file{hint}")
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


def check_bank_id(state: dict[str, Any], checkpoint: Path | str, bank: Path | str,
                  bank_id: str | None) -> None:
    """DataError unless `bank` (of id `bank_id`) is the bank the checkpoint trained: another
    run's bank on the same shards, even at the same step, holds other rows. A checkpoint
    written before banks had ids records none: no check."""
    want = state.get("bank_id")
    if want is None or want == bank_id:
        return
    have = f"bank {bank_id}" if bank_id is not None else "a bank without an id"
    raise DataError(f"{bank}: is not the bank the checkpoint {checkpoint} trained ({have}, the "
                    f"checkpoint's is bank {want}): another run's bank, or a copy made anew")


def repair_metrics(path: Path, epoch: int, record: dict[str, Any] | None) -> None:
    """Make the run's metrics log agree with a checkpoint after `epoch` whole epochs (resume).

    An epoch's line is appended after its checkpoint commits, so a kill in between loses it and
    a kill during the append cuts it: keep one parseable line per epoch up to `epoch`, and add
    the checkpoint's own `record` of epoch `epoch` when the line is missing. Rewritten
    atomically, only when something changes."""
    try:
        lines = path.read_text().splitlines() if path.exists() else []
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable metrics log ({e})") from None
    keep: dict[int, str] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue  # cut by a kill
        if isinstance(rec, dict) and type(rec.get("epoch")) is int and 1 <= rec["epoch"] <= epoch:
            keep.setdefault(rec["epoch"], line)
    if record is not None and record.get("epoch") == epoch and epoch not in keep:
        keep[epoch] = json.dumps(record)
    out = [keep[e] for e in sorted(keep)]
    if out == lines:
        return
    atomic_write(path, "".join(x + "\n" for x in out), "the repaired metrics log")


def model_from_checkpoint(state: dict[str, Any], device: torch.device, where: str) -> Embedder:
    """Rebuild the model of a checkpoint (strict load)."""
    try:
        model = build_model(state["arch"], int(state["in_channels"]), int(state["dim"]))
        model.load_state_dict(state["model"], strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise DataError(f"{where}: checkpoint does not match its architecture: "
                        f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval()
