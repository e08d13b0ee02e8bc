"""The bank's metadata sidecar (`oocid.json` / `<path>.meta.json`): its fields, their checks, and
the row dtypes a bank may store."""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from oocid.errors import DataError

BANK_FORMAT = "oocid-bank"
BANK_VERSION = 3  # 3: previous_step, bank_id; 2: journals in parts named by a commit record; 1: one journal
READABLE_VERSIONS = (1, 2, 3)
DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


@dataclass(frozen=True)
class BankMeta:
    """The bank's metadata sidecar (`oocid.json` / `<path>.meta.json`)."""

    n_rows: int
    dim: int
    dtype: str
    chunk_rows: int
    manifest_id: str | None = None
    momentum: float | None = None
    committed_step: int = -1
    previous_step: int | None = None  # the step committed before (None: unknown, version < 3)
    bank_id: str | None = None  # random, made with the bank (None: read from version < 3)
    init: str = "unit-gaussian"
    seed: int = 0
    format: str = BANK_FORMAT
    version: int = BANK_VERSION

    @classmethod
    def from_json(cls, obj: Any, where: Path) -> BankMeta:
        """Parse and check a decoded metadata object; DataError naming `where` if malformed."""
        if not isinstance(obj, dict) or obj.get("format") != BANK_FORMAT:
            raise DataError(f"{where}: not an oocid bank metadata file")
        if obj.get("version") not in READABLE_VERSIONS or type(obj.get("version")) is not int:
            raise DataError(f"{where}: unsupported bank version {obj.get('version')!r}")
        names = {f.name for f in fields(cls)}
        if obj["version"] < 3:  # written before previous_step and bank_id were kept
            obj = {"previous_step": None, **obj}
        obj = {"bank_id": None, **obj}  # also absent from a version 3 of before the ids
        if set(obj) != names:
            raise DataError(f"{where}: bank metadata keys differ from {sorted(names)}")
        meta = cls(**obj)
        ints = ("n_rows", "dim", "chunk_rows", "committed_step", "seed")
        bad = [k for k in ints if type(getattr(meta, k)) is not int]
        if meta.dtype not in DTYPES or meta.n_rows < 1 or meta.dim < 1 or meta.chunk_rows < 1:
            bad.append("n_rows/dim/chunk_rows/dtype")
        if obj["manifest_id"] is not None and not isinstance(obj["manifest_id"], str):
            bad.append("manifest_id")
        if obj["momentum"] is not None and not isinstance(obj["momentum"], (int, float)):
            bad.append("momentum")
        if obj["previous_step"] is not None and type(obj["previous_step"]) is not int:
            bad.append("previous_step")
        if obj["bank_id"] is not None and not isinstance(obj["bank_id"], str):
            bad.append("bank_id")
        if bad:
            raise DataError(f"{where}: bad bank metadata field(s) {', '.join(bad)}")
        return meta

    def to_bytes(self) -> bytes:
        """The sidecar file's content."""
        return json.dumps(asdict(self), indent=1).encode()


def new_bank_id() -> str:
    """A bank's identity: random, made when the bank is created (or upgraded to version 3), so
    that two banks of the same shards, even at the same step, are told apart."""
    return secrets.token_hex(8)
