"""oocid: out-of-core instance discrimination (NPID, Wu et al., CVPR 2018).

For your own model and training loop (examples/own_loop.py):

    from oocid import OnDiskBank, NPIDLoss, weighted_knn

The packages, bottom to top (imports only run downward):
    oocid.method   the NPID math: losses, momentum update, the training step, kNN scoring
    oocid.data     images -> WebDataset shards + manifest -> augmented batches
    oocid.bank     the memory bank: on disk, cached on the device, crash-safe commits
    oocid.eval     kNN evaluation, retrieval, embeddings, linear probe, export, plots
    oocid.train    the training loop and its checkpoints
    oocid.cli      the `oocid` command
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oocid.version import __version__

if TYPE_CHECKING:
    from oocid.api import NPIDLoss, OnDiskBank
    from oocid.method.knn import weighted_knn
    from oocid.method.npid import momentum_update

__all__ = ["NPIDLoss", "OnDiskBank", "__version__", "momentum_update", "weighted_knn"]
_LAZY = {"NPIDLoss": "oocid.api", "OnDiskBank": "oocid.api", "weighted_knn": "oocid.method.knn",
         "momentum_update": "oocid.method.npid"}


def __getattr__(name: str) -> Any:
    """Import the public names on first use: `import oocid` (the CLI's start) stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'oocid' has no attribute {name!r}")
