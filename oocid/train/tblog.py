"""Optional TensorBoard logging: the per-epoch metrics of `metrics.jsonl` as scalars in RUN/tb.

Off by default (`train.tensorboard = true` or `oocid train --tensorboard` turns it on). The
`tensorboard` package is not a dependency of oocid (`pip install tensorboard`, or the `tb`
extra); asking for TensorBoard without it is an input error before training starts, never a
silently ignored option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oocid.errors import InputError

SKIP = frozenset({"epoch", "step"})  # the x axis, not a curve


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise InputError("train.tensorboard = true needs the tensorboard package "
                         f"(pip install tensorboard, or pip install 'oocid[tb]'): {e}") from None
    return SummaryWriter


def require_tensorboard() -> None:
    """InputError unless torch.utils.tensorboard can be imported."""
    _summary_writer_class()


class TensorBoardLog:
    """One scalar per numeric metric of each epoch's record, at global step = epoch."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.writer = _summary_writer_class()(log_dir=str(self.log_dir))

    def write(self, rec: dict[str, Any]) -> None:
        epoch = int(rec["epoch"])
        for key, value in rec.items():
            if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # e.g. the list of collapse causes
            self.writer.add_scalar(key, float(value), global_step=epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
