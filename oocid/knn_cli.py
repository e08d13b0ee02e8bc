"""`oocid knn`: embed labeled validation shards with a checkpoint's model and classify them
by weighted kNN against the on-disk bank (streamed chunk by chunk)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .config import config_from_dict
from .errors import DataError, InputError
from .evaluate import check_same_classes, knn_store, num_classes_of, read_labels
from .shards import read_manifest
from .store import open_store
from .stream import eval_batches, extract_features
from .train import model_from_checkpoint, resolve_device


def run_knn(bank: Path, checkpoint: Path, val: Path, train_shards: Path | None, k: int,
            temperature: float, device_name: str = "auto") -> dict[str, Any]:
    if k < 1:
        raise InputError(f"--k must be >= 1, got {k}")
    if temperature <= 0:
        raise InputError(f"--temperature must be > 0, got {temperature}")
    device = resolve_device(device_name)
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"], str(checkpoint))
    model = model_from_checkpoint(state, device, str(checkpoint))
    with open_store(bank, read_only=True) as store:
        if store.meta.manifest_id is not None and store.meta.manifest_id != state["manifest_id"]:
            raise DataError(f"{bank}: belongs to other shards than the checkpoint {checkpoint}")
        tpath = train_shards if train_shards is not None else Path(state.get("shards", ""))
        if not str(tpath) or not tpath.exists():
            raise InputError(f"{checkpoint}: training shards {str(tpath)!r} not found; pass "
                             "--train-shards for the bank's labels")
        tm = read_manifest(tpath)
        if tm.identity != state["manifest_id"] or tm.n != store.n_rows:
            raise DataError(f"{tpath}: are not the shards the bank {bank} was trained on")
        vm = read_manifest(val)
        check_same_classes(tm, vm, val)
        labels = read_labels(tm)
        if (labels < 0).any():
            raise DataError(f"{tpath}: training shards are unlabeled; kNN accuracy needs labels")
        feats, _, vlab = extract_features(model, eval_batches(vm, cfg.data, device),
                                          cfg.model.channels_last)
        if (vlab < 0).any():
            raise DataError(f"{val}: validation shards are unlabeled")
        acc = knn_store(feats, vlab, store, torch.from_numpy(labels), k, temperature,
                        num_classes_of(tm, labels), device)
        return {**acc, "k": k, "temperature": temperature, "queries": int(feats.shape[0]),
                "bank_rows": store.n_rows, "bank": str(bank), "checkpoint": str(checkpoint),
                "features": "memory bank"}
