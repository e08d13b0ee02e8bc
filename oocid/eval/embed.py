"""`oocid embed`: features of any shard set, in index order, written to .npy or .npz.

Images go through the checkpoint's test transform (`oocid.data.eval_data.eval_batches`), batches are
embedded and written straight into a memory-mapped array at their index, so the features
never have to fit in memory. M = samples embedded (N minus undecodable ones), F = width.

    OUT.npy  (M, F) float32   + OUT.index.npy (M,) int64 + OUT.labels.npy (M,) int64 (-1: none)
    OUT.npz  keys features, index, labels (the same arrays), and classes (C,) str when the
             shards have class names (label j is classes[j], as in the shards' manifest.json)
"""

from __future__ import annotations

import errno
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from oocid.atomic import AtomicFile, check_writable, write_error
from oocid.checkpoint import load_checkpoint, model_from_checkpoint
from oocid.config import Config, config_from_dict
from oocid.data.batch import Batch
from oocid.data.eval_data import eval_batches
from oocid.data.manifest import Manifest, read_manifest, verify_shards
from oocid.device import resolve_device
from oocid.errors import DataError, InputError
from oocid.progress import progress_bar


@torch.no_grad()
def iter_features(model: nn.Module, batches: Iterator[Batch], channels_last: bool = False,
                  progress: bool = False, total: int | None = None, desc: str = "embed"
                  ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Stream (index (B,), features (B, F) float32, label (B,)) batch by batch (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        with progress_bar(total, desc, "img", enabled=progress, leave=False) as bar:
            for b in batches:
                x = b.images.contiguous(memory_format=torch.channels_last) if channels_last \
                    else b.images
                yield b.index, model(x).float(), b.label
                bar.update(int(b.index.numel()))
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class EmbedResult:
    paths: tuple[Path, ...]
    rows: int  # M
    dim: int  # F
    skipped: int  # N - M


def output_paths(out: Path) -> tuple[Path, ...]:
    """OUT.npz, or OUT.npy with OUT.index.npy and OUT.labels.npy beside it."""
    if out.suffix == ".npz":
        return (out,)
    if out.suffix != ".npy":
        raise InputError(f"{out}: name the output *.npy (with .index.npy/.labels.npy beside) "
                         "or *.npz")
    stem = out.with_suffix("")
    return out, Path(f"{stem}.index.npy"), Path(f"{stem}.labels.npy")


def embed_shards(checkpoint: Path, shards: Path, out: Path, *, pre_fc: bool = False,
                 device_name: str = "auto", batch_size: int = 256, progress: bool = False,
                 verify: bool = False) -> EmbedResult:
    """Embed every sample of `shards` with the model of `checkpoint` and write `out`
    (`verify`: each shard's sha256 checked against the manifest first)."""
    output_paths(out)
    check_writable(out, "features")  # before the work: exit 4 now, not after embedding
    manifest = read_manifest(shards)
    if verify:
        verify_shards(manifest, progress=progress)
    device = resolve_device(device_name)
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"], str(checkpoint))
    emb = model_from_checkpoint(state, device, str(checkpoint))
    from oocid.eval.export import pre_fc as strip_head

    model: nn.Module = strip_head(emb) if pre_fc else emb
    return write_features(model, emb.in_channels, manifest, cfg, device, out, batch_size,
                          progress)


def write_features(model: nn.Module, in_channels: int, manifest: Manifest, cfg: Config,
                   device: torch.device, out: Path, batch_size: int = 256,
                   progress: bool = False) -> EmbedResult:
    """Features of every sample of `manifest` (test transform of `cfg.data`) written to `out`,
    each batch straight into an (N, F) memory map at its index."""
    paths = output_paths(out)
    check_writable(out, "features")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    n = manifest.n
    tmp = out.with_name(out.name + ".rows.tmp")
    try:
        feats: np.ndarray | None = None
        index_seen = np.zeros(n, dtype=bool)
        labels = np.full(n, -1, dtype=np.int64)
        batches = eval_batches(manifest, cfg.data, device, batch_size, channels=in_channels)
        for idx, f, lab in iter_features(model, batches, cfg.model.channels_last, progress, n):
            if feats is None:  # (N, F) on disk, rows at their index
                feats = _open_rows(tmp, n, f.shape[1])
            i = idx.cpu().numpy()
            feats[i] = f.cpu().numpy()
            labels[i] = lab.cpu().numpy()
            index_seen[i] = True
        if feats is None:
            raise DataError(f"{manifest.root}: no sample could be decoded")
        keep = np.flatnonzero(index_seen)
        _write(paths, feats, keep, labels[keep], manifest.classes)
        dim = int(feats.shape[1])
        del feats
    except OSError as e:
        raise write_error(out, "features", e) from None
    finally:
        tmp.unlink(missing_ok=True)
    return EmbedResult(paths, len(keep), dim, n - len(keep))


def _open_rows(tmp: Path, n: int, dim: int) -> np.ndarray:
    """The (n, dim) float32 memory map the batches are written into, its disk blocks allocated
    now: on a full disk a write to a page of a sparse map kills the process (SIGBUS, no
    message); allocating first turns that into an OSError here."""
    rows: np.ndarray = np.lib.format.open_memmap(tmp, "w+", np.float32, (n, dim))
    if hasattr(os, "posix_fallocate"):
        with open(tmp, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # ENOSPC, EFBIG, EDQUOT
                    raise
    return rows


def _rows(feats: np.ndarray, keep: np.ndarray, block: int = 65536) -> Iterator[np.ndarray]:
    full = len(keep) == feats.shape[0]
    for a in range(0, len(keep), block):
        yield np.asarray(feats[a:a + block] if full else feats[keep[a:a + block]])


def _write(paths: tuple[Path, ...], feats: np.ndarray, keep: np.ndarray, labels: np.ndarray,
           classes: tuple[str, ...] | None = None) -> None:
    """Features (rows `keep` of `feats`), index, labels (and in an .npz the class names), each
    file written under a temporary name; all are put in place once all are written, so a
    failed write leaves the files of an earlier run as they were (and no temporary file)."""
    shape = (len(keep), feats.shape[1])
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
              "fortran_order": False, "shape": shape}
    files: list[AtomicFile] = []
    try:
        for p in paths:
            files.append(AtomicFile(p, "features"))
        if len(paths) == 1:  # .npz: stream the features into the archive member
            with zipfile.ZipFile(files[0].file, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                with z.open("features.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_2_0(f, header)
                    for r in _rows(feats, keep):
                        f.write(np.ascontiguousarray(r, np.float32).tobytes())
                arrays = [("index", keep.astype(np.int64)), ("labels", labels)]
                if classes is not None:
                    arrays.append(("classes", np.array(classes, dtype=np.str_)))
                for name, arr in arrays:
                    with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, arr)
        else:
            feat_file, index_file, labels_file = (a.file for a in files)
            for f, arr in ((index_file, keep.astype(np.int64)), (labels_file, labels)):
                np.lib.format.write_array(f, arr)
            np.lib.format.write_array_header_2_0(feat_file, header)
            for r in _rows(feats, keep):
                feat_file.write(np.ascontiguousarray(r, np.float32).tobytes())
    except BaseException:
        for a in files:
            a.abort()
        raise
    for a in files:
        a.commit()
