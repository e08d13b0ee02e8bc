"""Validation classes matched to the training classes by name.

A label is a position in its shard set's `classes`, so two shard sets written from different
folders number a class differently whenever their class lists differ: a validation set with
fewer classes than the training set, or one whose names are written in another Unicode form
(macOS writes file names decomposed, NFD). `class_map` maps each validation label to the
training label of the class of the same name, names compared after NFC normalisation; the
scores themselves are over the training classes as before.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from oocid.data.manifest import Manifest
from oocid.errors import DataError

NAMED = 5  # classes named in an error; the rest are counted


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _listed(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:NAMED])
    return shown + (f" and {len(names) - NAMED} more" if len(names) > NAMED else "")


def class_map(train: Manifest, val: Manifest, val_path: Path) -> np.ndarray | None:
    """(C_val,) int64: the training label of each validation class, matched by name (NFC);
    None when either set has no class names (the labels are taken as they are). Training
    classes without validation images are fine; a validation class that is not a training
    class is a DataError naming it (the first few, and how many)."""
    if not train.classes or not val.classes:
        return None
    ids: dict[str, int] = {}
    same: dict[str, list[str]] = {}  # a name that two training classes spell differently
    for i, name in enumerate(train.classes):
        key = _nfc(name)
        if key in ids:
            same.setdefault(key, [train.classes[ids[key]]]).append(name)
        ids.setdefault(key, i)
    missing = [name for name in val.classes if _nfc(name) not in ids]
    if missing:
        raise DataError(f"{val_path}: {len(missing)} of its {len(val.classes)} classes are not "
                        f"among the training shards' {len(train.classes)}: {_listed(missing)}")
    clash = [same[_nfc(name)] for name in val.classes if _nfc(name) in same]
    if clash:
        raise DataError(f"{train.root}: classes {_listed(clash[0])} are one name in two Unicode "
                        f"forms, so the class {clash[0][0]!r} of {val_path} matches both")
    return np.array([ids[_nfc(name)] for name in val.classes], dtype=np.int64)


def training_labels(labels: Tensor, mapping: np.ndarray | None, val_path: Path) -> Tensor:
    """Validation labels (Q,) as training labels; negative ones (unlabeled) kept as they are.
    DataError for a label outside the validation set's classes."""
    if mapping is None or labels.numel() == 0:
        return labels
    if int(labels.max()) >= len(mapping):
        raise DataError(f"{val_path}: label {int(labels.max())} outside its {len(mapping)} "
                        "classes")
    lut = torch.as_tensor(mapping, device=labels.device)
    return torch.where(labels < 0, labels, lut[labels.clamp(min=0)])


def not_held_out(train: Manifest, val: Manifest) -> str | None:
    """One warning line when the validation shards are the training shards (the same manifest
    identity, wherever the folders are), else None: a kNN score of the training images against
    their own rows says little about images the net has not seen."""
    if train.identity != val.identity:
        return None
    return ("oocid: warning: the validation shards are the training shards: the accuracy is not "
            "on held-out images")
