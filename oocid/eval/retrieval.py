"""Nearest training images: the training side as a stream of features (the memory bank's
chunks, or features recomputed with the test transform), a streamed top-k that keeps global
indices, query images embedded as the training data is at test time, the neighbours' samples
looked up in the shards, and the contact sheet.

Q queries, N training samples, D feature dims, k neighbours.
"""

from __future__ import annotations

import bisect
import sys
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from oocid.bank.parts import chunks_of, committed, iter_part_chunks
from oocid.bank.store import open_store
from oocid.checkpoint import check_bank_id, load_checkpoint, model_from_checkpoint
from oocid.config import Config, DataConfig, config_from_dict
from oocid.data.augment import batch_eval_transform, sample_transform
from oocid.data.batch import fits_in_memory, normalization_stats
from oocid.data.decode import decode_file, decode_image
from oocid.data.eval_data import eval_batches
from oocid.data.manifest import IMAGE_EXTS, Manifest, read_manifest, verify_shards
from oocid.data.reader import RawSample, iter_samples
from oocid.device import resolve_device
from oocid.errors import DataError, InputError, one_line
from oocid.eval.embed import iter_features
from oocid.method.knn import BLOCK_ROWS, topk_streaming
from oocid.models import Embedder


@dataclass
class TrainingSide:
    """The model of a checkpoint and the features of the training set it was trained on."""

    checkpoint: Path
    cfg: Config
    model: Embedder
    device: torch.device
    manifest: Manifest
    bank: Path | None
    recompute: bool
    progress: bool = False
    parts: tuple[Path, ...] = ()  # every part of a node-local bank (bank is the first)

    @property
    def features(self) -> str:
        return "recomputed" if self.recompute else "memory bank"

    def chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(index (n,) int64, rows (n, D) unit float) covering the training set, streamed."""
        if self.recompute:
            yield from embedded_chunks(self.model, self.manifest, self.cfg.data, self.device,
                                       self.cfg.model.channels_last, self.progress)
            return
        assert self.bank is not None
        yield from bank_chunks(self.parts or (self.bank,), self.device)


def embedded_chunks(model: Embedder, manifest: Manifest, data_cfg: DataConfig,
                    device: torch.device, channels_last: bool = False, progress: bool = False,
                    desc: str = "training features") -> Iterator[tuple[Tensor, Tensor]]:
    """(index (b,), features (b, D)) of every sample of `manifest` embedded by `model` with the
    test transform, batch by batch: the training side of `--recompute` and of the baselines."""
    batches = eval_batches(manifest, data_cfg, device)
    for idx, f, _ in iter_features(model, batches, channels_last, progress, manifest.n, desc):
        yield idx, f


def bank_chunks(banks: Sequence[Path], device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """(index (n,), rows (n, D) float32) of every chunk of a bank on disk (or of a node-local
    bank's parts, each chunk from the part that trained it), read one at a time (pread, not a
    memory map: the bank's pages never count in the process's RSS)."""
    for lo, rows in iter_part_chunks(banks):
        yield torch.arange(lo, lo + len(rows)), torch.from_numpy(rows).to(device)


def load_training_side(checkpoint: Path, banks: Sequence[Path] | None, train_shards: Path | None,
                       device_name: str = "auto", recompute: bool = False,
                       progress: bool = False, *, verify: bool = False) -> TrainingSide:
    """Load the checkpoint's model and check the bank (or every part of a node-local bank) and
    the training shards belong to it (with `verify`, each shard's sha256 against the manifest
    too). A bank whose id is not the checkpoint's is refused; one at another step than the
    checkpoint is used with a warning that says which is ahead."""
    parts = tuple(banks or ())
    if parts:
        chunks_of(parts)  # a whole bank, or parts that make one
    bank = parts[0] if parts else None
    if bank is None and not recompute:
        raise InputError("give --bank (the trained bank), or --recompute to use training "
                         "features computed now with the test transform")
    device = resolve_device(device_name)
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"], str(checkpoint))
    model = model_from_checkpoint(state, device, str(checkpoint))
    tpath = train_shards if train_shards is not None else Path(state.get("shards", ""))
    if not str(tpath) or not tpath.exists():
        raise InputError(f"{checkpoint}: training shards {str(tpath)!r} not found; pass "
                         "--train-shards")
    tm = read_manifest(tpath)
    if tm.identity != state["manifest_id"]:
        raise DataError(f"{tpath}: are not the shards the checkpoint {checkpoint} was trained on")
    if verify:
        verify_shards(tm, progress=progress)
    for bank in parts:
        with open_store(bank, read_only=True) as store:
            mid = store.meta.manifest_id
            if (mid is not None and mid != state["manifest_id"]) or store.n_rows != tm.n:
                raise DataError(f"{bank}: belongs to other shards than the checkpoint "
                                f"{checkpoint} ({store.n_rows} rows, {tpath} has {tm.n} samples)")
            if store.dim != model.out_dim:
                raise DataError(f"{bank}: rows of dimension {store.dim}, the model's are "
                                f"{model.out_dim}")
            check_bank_id(state, checkpoint, bank, store.meta.bank_id)
            warning = step_warning(bank, committed(store), checkpoint, state.get("step"))
            if warning is not None:
                print(warning, file=sys.stderr)
    return TrainingSide(checkpoint, cfg, model, device, tm, parts[0] if parts else None,
                        recompute, progress, parts if len(parts) > 1 else ())


def step_warning(bank: Path, bank_step: int, checkpoint: Path, step: int | None) -> str | None:
    """One line when the bank the checkpoint trained is at another step than the checkpoint
    (None: at the same one, or a checkpoint without a step): the checkpoint is older or newer
    than the bank's last commit, and the rows are used as they are."""
    if step is None or bank_step == step:
        return None
    gap = abs(bank_step - step)
    n = f"{gap} step" + ("s" if gap != 1 else "")
    how = (f"{n} ahead of the checkpoint {checkpoint} (step {step}): its rows were "
           "trained further than this model" if bank_step > step else
           f"{n} behind the checkpoint {checkpoint} (step {step}): its rows are older "
           "than this model")
    return (f"oocid: warning: {bank} is at step {bank_step}, {how}; they are used as they are "
            "(give the checkpoint of the bank's step for matching features)")


def topk_indexed(queries: Tensor, chunks: Iterable[tuple[Tensor, Tensor]], k: int, *,
                 block_rows: int = BLOCK_ROWS) -> tuple[Tensor, Tensor]:
    """`knn.topk_streaming` over chunks given as (index (n,), rows (n, D)) in any order:
    (sims (Q, k'), global index (Q, k')) sorted by decreasing similarity, k' = min(k, rows);
    `block_rows`: rows scored per GEMM (fewer for wide rows: pixels).
    Memory: one block of chunks, the (Q, k) buffers, and the chunks' indices: a (start, n) pair
    per chunk of consecutive indices (the bank's), else the (rows,) int64 index map."""
    seen: list[tuple[int, int] | Tensor] = []  # per chunk: (first index, n) or its indices
    ended: list[bool] = []  # the chunks ran out (rather than raised)

    def positions() -> Iterator[tuple[int, Tensor]]:
        offset = 0
        for idx, rows in chunks:
            idx = idx.to(torch.int64).cpu()
            n = idx.shape[0]
            first = int(idx[0]) if n else 0
            consecutive = n > 0 and int(idx[-1]) - first == n - 1 and bool((idx.diff() == 1).all())
            seen.append((first, n) if consecutive else idx)
            yield offset, rows
            offset += rows.shape[0]
        ended.append(True)

    try:
        sims, pos = topk_streaming(queries, positions(), k, block_rows=block_rows)
    except ValueError:
        if not ended or seen:  # an error of a chunk's source, not an empty stream: as it is
            raise
        raise DataError("no training features to search (every sample failed to decode?)") from None
    pos = pos.cpu()
    if all(isinstance(c, tuple) for c in seen):  # index = first index of its chunk + offset in it
        firsts = torch.tensor([c[0] for c in seen if isinstance(c, tuple)], dtype=torch.int64)
        sizes = torch.tensor([c[1] for c in seen if isinstance(c, tuple)], dtype=torch.int64)
        offsets = sizes.cumsum(0) - sizes
        chunk = torch.searchsorted(offsets, pos, right=True) - 1
        index = firsts[chunk] + (pos - offsets[chunk])
    else:
        index = torch.cat([torch.arange(c[0], c[0] + c[1]) if isinstance(c, tuple) else c
                           for c in seen])[pos]
    return sims, index.to(sims.device)


# ---------------------------------------------------------------------------- queries


def query_files(paths: Sequence[Path]) -> list[Path]:
    """Files as given; folders searched recursively for image files (sorted)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and f.suffix.lower() in IMAGE_EXTS
                           and not any(s.startswith(".") for s in f.relative_to(p).parts))
            if not found:
                raise InputError(f"{p}: no image files in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return files


def thumbnail(sample: RawSample, channels: int) -> Image.Image:
    """A training sample's image for display (grey if it does not decode)."""
    try:
        return decode_image(sample.image, channels)
    except Exception:  # a bad sample was skipped in training; its bank row is still there
        return Image.new("L" if channels == 1 else "RGB", (32, 32), 128)


def load_queries(files: Sequence[Path], channels: int, named: Sequence[Path]
                 ) -> tuple[list[Path], list[Image.Image]]:
    """The query files that decode, and their images. A file found in a folder that does not
    decode is skipped with one warning line giving the reason; a file in `named` (given by
    itself) is an InputError, and so are no readable images at all."""
    direct = set(named)
    kept: list[Path] = []
    images: list[Image.Image] = []
    for f in files:
        try:
            images.append(decode_file(f.read_bytes(), channels))
        except Exception as e:  # PIL raises many kinds for a non-image
            if f in direct:
                raise InputError(f"{f}: not a readable image ({one_line(e)})") from None
            print(f"oocid: warning: skipped {f}: {one_line(e)}", file=sys.stderr)
            continue
        kept.append(f)
    if not kept:
        raise InputError(f"{', '.join(map(str, named))}: no readable query images "
                         f"({len(files)} skipped, each named above)")
    return kept, images


def query_transform(manifest: Manifest, data: DataConfig, channels: int
                    ) -> Callable[[Image.Image], Tensor]:
    """PIL image -> (C, S, S): the test transform `eval_data.eval_batches` applies to `manifest`
    (the batched resize + centre crop on tensors where the set is held in memory, else the same
    steps per sample on the PIL image)."""
    mean, std = normalization_stats(data, channels)
    if data.in_memory != "no" and fits_in_memory(manifest, channels, data.in_memory_max_mb):
        tf = batch_eval_transform(data.augment, data.image_size, mean, std)

        def apply(img: Image.Image) -> Tensor:
            arr = np.asarray(img).reshape(img.height, img.width, channels)
            return tf(torch.from_numpy(arr.transpose(2, 0, 1).copy())[None])[0]

        return apply
    return sample_transform(data.augment, data.image_size, mean, std, data.crop_scale_min,
                            train=False)


@torch.no_grad()
def embed_images(side: TrainingSide, images: Sequence[Image.Image], batch: int = 256) -> Tensor:
    """(Q, D) unit features of PIL images (decoded with the model's channels)."""
    tf = query_transform(side.manifest, side.cfg.data, side.model.in_channels)
    x = torch.stack([tf(im) for im in images]).to(side.device)  # (Q, C, S, S)
    if side.cfg.model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    side.model.eval()
    return torch.cat([side.model(part).float() for part in x.split(batch)])  # type: ignore[no-untyped-call]


# ---------------------------------------------------------------------------- neighbours


def shard_of(manifest: Manifest, index: int) -> int:
    """Position in `manifest.shards` of the shard holding global `index` (by its range)."""
    s = bisect.bisect_right([sh.start for sh in manifest.shards], index) - 1
    if s < 0 or not manifest.shards[s].start <= index < manifest.shards[s].stop:
        raise DataError(f"{manifest.root}: no shard holds index {index}")
    return s


def lookup_samples(manifest: Manifest, indices: Iterable[int]) -> dict[int, RawSample]:
    """The raw samples of global `indices`: each needed shard read once, up to its last one."""
    wanted: dict[int, set[int]] = {}
    for i in set(int(i) for i in indices):
        wanted.setdefault(shard_of(manifest, i), set()).add(i)
    found: dict[int, RawSample] = {}
    for s, want in sorted(wanted.items()):
        path = manifest.root / manifest.shards[s].name
        left = set(want)
        for sample in iter_samples(path):
            if sample.index in left:
                found[sample.index] = sample
                left.discard(sample.index)
                if not left:
                    break
        if left:
            raise DataError(f"{path}: samples {sorted(left)[:5]} not found in the shard")
    return found


def source_path(manifest: Manifest, path: str) -> str:
    """A sample's source path as the user knows it (npz members keep their `npz:` name)."""
    return f"{manifest.source} ({path})" if path.startswith("npz:") else str(
        Path(manifest.source) / path)


# ---------------------------------------------------------------------------- contact sheet

PAD, CAPTION = 4, 14  # pixels between cells; caption strip under each tile


def sheet_size(rows: int, cols: int, tile: int) -> tuple[int, int]:
    """(width, height) of a contact sheet of rows x cols tiles of tile x tile pixels."""
    return cols * (tile + PAD) + PAD, rows * (tile + CAPTION + PAD) + PAD


_NO_GLYPH = "\u0378"  # an unassigned code point: what a font draws for a character it lacks


def _drawable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """`text` with each character the font cannot draw replaced by its base letter (é -> e)
    when it can draw that, else by "?" (Pillow's built-in font draws ASCII only)."""
    def mask(t: str) -> tuple[tuple[int, int], bytes] | None:
        try:
            m = font.getmask(t)
        except UnicodeError:  # the bitmap font without FreeType: Latin-1 only
            return None
        return m.size, bytes(m)

    missing = mask(_NO_GLYPH)

    def ok(ch: str) -> bool:
        got = mask(ch)
        return got is not None and got != missing

    out = []
    for ch in text:
        base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        out.append(ch if ok(ch) else base if base and all(ok(c) for c in base) else "?")
    return "".join(out)


def fit_caption(text: str, width: int, keep: int = 0) -> str:
    """`text` in characters the contact sheet's font draws (`_drawable`), shortened in the
    middle (its start and end kept, "…" between) to at most `width` pixels; the first `keep`
    characters are never cut (a similarity before a class name)."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    text = _drawable(text, font)
    dots = "…" if _drawable("…", font) == "…" else "..."
    head, rest = text[:keep], text[keep:]

    def fits(t: str) -> bool:
        return float(draw.textlength(t, font=font)) <= width

    if fits(text):
        return text
    for n in range(len(rest) - 1, 0, -1):
        cut = head + rest[:(n + 1) // 2] + dots + rest[len(rest) - n // 2:]
        if fits(cut):
            return cut
    return next((t for t in (head + dots, head.rstrip(), dots) if fits(t)), "")


def contact_sheet(rows: Sequence[Sequence[tuple[Image.Image, str]]], tile: int = 96
                  ) -> Image.Image:
    """One row per list of (image, caption); images fitted into tile x tile (tiny ones scaled
    up without smoothing), the first cell of each row framed (the query)."""
    cols = max((len(r) for r in rows), default=1)
    sheet = Image.new("RGB", sheet_size(len(rows), cols, tile), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        for c, (img, caption) in enumerate(row):
            x0, y0 = PAD + c * (tile + PAD), PAD + r * (tile + CAPTION + PAD)
            scale = tile / max(img.width, img.height)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
            im = img.convert("RGB").resize(size, resample)
            sheet.paste(im, (x0 + (tile - im.width) // 2, y0 + (tile - im.height) // 2))
            if c == 0:
                draw.rectangle((x0 - 2, y0 - 2, x0 + tile + 1, y0 + tile + 1), outline=(200, 0, 0))
            draw.text((x0 + 2, y0 + tile + 1), caption, fill="black", font=font)
    return sheet
