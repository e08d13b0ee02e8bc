"""`oocid knn`: classify labeled validation shards by weighted kNN (docs/method.md, "Weighted kNN"), or
find the training images nearest to query images.

The training features are the on-disk bank (streamed chunk by chunk) or, with `recompute`,
the training shards embedded now with the test transform (streamed batch by batch). Top-k is
computed once at the largest k and reused for every smaller k.
Q queries, C classes, k neighbours.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from oocid.atomic import check_writable
from oocid.config import temperature_floor
from oocid.data.eval_data import eval_batches, extract_features
from oocid.data.manifest import read_manifest, verify_shards
from oocid.errors import DataError, InputError
from oocid.eval.baselines import baseline_results, format_baselines
from oocid.eval.classes import class_map, not_held_out, training_labels
from oocid.eval.evaluate import knn_report, num_classes_of, read_labels
from oocid.eval.plot import save_image
from oocid.eval.retrieval import (
    contact_sheet,
    embed_images,
    fit_caption,
    load_queries,
    load_training_side,
    lookup_samples,
    query_files,
    shard_of,
    source_path,
    thumbnail,
    topk_indexed,
)

CONFUSION_AXES = "rows: true class, columns: predicted class (both in `classes` order)"


def _check_ks(ks: Sequence[int], temperature: float) -> list[int]:
    if not ks or any(k < 1 for k in ks):
        raise InputError(f"--k must be >= 1, got {list(ks)}")
    least = temperature_floor(max(ks))
    if not temperature > least:
        raise InputError(f"--temperature must be > {least:.4g} with --k {max(ks)} (the weights "
                         f"exp(s / t) overflow below), got {temperature}")
    return sorted(set(ks))


def run_knn(bank: Path | Sequence[Path] | None, checkpoint: Path, val: Path, train_shards: Path | None,
            k: int | Sequence[int], temperature: float, device_name: str = "auto", *,
            recompute: bool = False, progress: bool = False, verify: bool = False,
            baselines: bool = False) -> dict[str, Any]:
    """Weighted kNN accuracy of `val` for every k; the top-level numbers are those of the
    largest k, `by_k` holds each (keyed by the k asked for; "k" in each is the k used,
    min(k, training rows)). `verify`: check every shard's sha256 first. `baselines`: also the
    same kNN over the baselines' features (`baseline_results`), under "baselines"."""
    ks = _check_ks([k] if isinstance(k, int) else list(k), temperature)
    vm = read_manifest(val)
    if verify:
        verify_shards(vm, progress=progress)
    side = load_training_side(checkpoint, _banks(bank), train_shards, device_name, recompute, progress,
                              verify=verify)
    tm = side.manifest
    mapping = class_map(tm, vm, val)  # validation classes matched to training ones by name
    labels = read_labels(tm)
    if (labels < 0).any():  # shards of the wrong kind for the command: input, as `train --val`
        raise InputError(f"{tm.root}: training shards are unlabeled; kNN accuracy needs labels")
    c = num_classes_of(tm, labels)
    classes = list(tm.classes) if tm.classes else [str(i) for i in range(c)]
    feats, _, vlab = extract_features(side.model, eval_batches(vm, side.cfg.data, side.device,
                                                           channels=side.model.in_channels),
                                      side.cfg.model.channels_last)
    if (vlab < 0).any():
        raise InputError(f"{val}: validation shards are unlabeled; kNN accuracy needs labels")
    vlab = training_labels(vlab, mapping, val)
    if int(vlab.max()) >= c:
        raise DataError(f"{val}: label {int(vlab.max())} outside the training set's {c} classes")
    sims, index = topk_indexed(feats, side.chunks(), max(ks))  # (Q, k'), once at the largest k
    warning = not_held_out(tm, vm)  # said once the search has succeeded, as the note below
    if warning is not None:
        print(warning, file=sys.stderr)
    counts = np.bincount(labels)
    fewest = int(counts[counts > 0].min()) if labels.size else 0
    if 0 < fewest < max(ks):  # votes beyond a class's size come from other classes
        print(f"oocid: note: k {max(ks)} is more than the {fewest} training images of the "
              "smallest class; a smaller --k may suit this set (the paper's 200 is for "
              "ImageNet's ~1,300 a class)", file=sys.stderr)
    nl = torch.from_numpy(labels).to(index.device)[index]
    evaluated = None if mapping is None else mapping.tolist()
    by_k = {str(kk): knn_report(sims, nl, vlab, kk, temperature, classes, evaluated)
            for kk in ks}
    base = {"baselines": baseline_results(side, vm, mapping, labels, ks, temperature, classes)
            } if baselines else {}
    return {**by_k[str(max(ks))], "ks": ks, "temperature": temperature,
            "queries": int(feats.shape[0]), "bank_rows": tm.n,
            "bank": _bank_name(bank),
            "checkpoint": str(checkpoint), "train_shards": str(tm.root),
            "features": side.features, "classes": classes, "confusion_axes": CONFUSION_AXES,
            "by_k": by_k, **base}


def format_result(res: dict[str, Any]) -> str:
    """`run_knn`'s result: a line per k, the per-class line, and the baselines' table if any."""
    lines = []
    for kk in res["ks"]:
        r = res["by_k"][str(kk)]
        top5 = f"  top-5 {r['top5']:.4f}" if "top5" in r else ""  # only with more than 5 classes
        used = f"k={r['k']}" if r["k"] == kk else f"k={r['k']}, all rows; asked {kk}"
        lines.append(f"kNN top-1 {r['top1']:.4f}{top5}  ({used}, t={res['temperature']}, "
                     f"{res['queries']} queries, {res['bank_rows']} training rows, "
                     f"{res['features']})")
    lines.append(format_per_class(res["per_class"], res["k"]))
    if "baselines" in res:
        lines.append(format_baselines(res))
    return "\n".join(lines)


def format_per_class(per_class: list[dict[str, Any]], k: int, most: int = 12) -> str:
    """One line of per-class top-1; with many classes, the worst and best few."""
    def item(p: dict[str, Any]) -> str:
        return f"{p['class']} {p['top1']:.2f}" if p["top1"] is not None else f"{p['class']} -"

    head = f"per-class top-1 (k={k}): "
    if len(per_class) <= most:
        return head + "  ".join(item(p) for p in per_class)
    ranked = sorted((p for p in per_class if p["top1"] is not None), key=lambda p: p["top1"])
    half = most // 2
    return (head + "worst " + "  ".join(item(p) for p in ranked[:half]) + " | best "
            + "  ".join(item(p) for p in ranked[-half:]))


def to_json(obj: Any, indent: str = "") -> str:
    """JSON with 2-space indent, but lists of numbers (a confusion row) and dicts of plain
    values (a neighbour, a class) on one line each."""
    step = indent + "  "
    flat = isinstance(obj, dict) and all(not isinstance(v, dict | list) for v in obj.values())
    if isinstance(obj, dict) and obj and not flat:
        items = [f"{step}{json.dumps(str(k))}: {to_json(v, step)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(obj, list) and obj and not all(isinstance(v, int | float) for v in obj):
        return "[\n" + ",\n".join(step + to_json(v, step) for v in obj) + f"\n{indent}]"
    return json.dumps(obj)


# ---------------------------------------------------------------------------- search


@dataclass
class QueryHits:
    query: Path
    image: Image.Image
    neighbours: list[dict[str, Any]]  # rank, similarity, index, shard, key, path, label, class
    thumbs: list[Image.Image]  # the neighbours' images, same order


def run_search(bank: Path | Sequence[Path] | None, checkpoint: Path, queries: Sequence[Path],
               train_shards: Path | None, k: int, device_name: str = "auto", *,
               recompute: bool = False, progress: bool = False, verify: bool = False
               ) -> tuple[dict[str, Any], list[QueryHits]]:
    """The k training images nearest to each query image (files, or folders of images);
    `verify`: check the training shards' sha256 first."""
    _check_ks([k], 1.0)
    files = query_files(queries)
    side = load_training_side(checkpoint, _banks(bank), train_shards, device_name, recompute, progress,
                              verify=verify)
    channels = side.model.in_channels
    files, images = load_queries(files, channels, queries)  # a folder's unreadable ones skipped
    sims, index = topk_indexed(embed_images(side, images), side.chunks(), k)  # (Q, k')
    used = sims.shape[1]  # k' = min(k, training rows)
    tm = side.manifest
    samples = lookup_samples(tm, index.flatten().tolist())
    hits = []
    for q, f in enumerate(files):
        found, thumbs = [], []
        for r, (s, i) in enumerate(zip(sims[q].tolist(), index[q].tolist(), strict=True)):
            raw = samples[i]
            label = raw.label
            name = tm.classes[label] if tm.classes and label is not None else None
            found.append({"rank": r + 1, "similarity": s, "index": i,
                          "shard": tm.shards[shard_of(tm, i)].name, "key": raw.key,
                          "path": source_path(tm, raw.path), "label": label, "class": name})
            thumbs.append(thumbnail(raw, channels))
        hits.append(QueryHits(f, images[q], found, thumbs))
    meta = {"checkpoint": str(checkpoint), "bank": _bank_name(bank),
            "train_shards": str(tm.root),
            "features": side.features, "k": used, **({"k_asked": k} if used < k else {})}
    return meta, hits


def search_json(meta: dict[str, Any], hits: list[QueryHits]) -> dict[str, Any]:
    return {**meta, "queries": [{"query": str(h.query), "neighbours": h.neighbours}
                                for h in hits]}


def format_hits(hits: list[QueryHits], meta: dict[str, Any] | None = None) -> str:
    """Each query's neighbours, one a line; first, when `meta` (`run_search`'s) says k was
    above the training rows, a line saying every row was used."""
    lines = []
    if meta is not None and "k_asked" in meta:
        lines.append(f"{meta['k']} neighbours per query (k={meta['k']}, all training rows; "
                     f"asked {meta['k_asked']})")
    for q, h in enumerate(hits):
        lines.append(f"query {q + 1}/{len(hits)}: {h.query}")
        for n in h.neighbours:
            cls = f"  [{n['class']}]" if n["class"] is not None else ""
            lines.append(f"  {n['rank']:>3}  {n['similarity']:.4f}  #{n['index']:<9} "
                         f"{n['shard']}:{n['key']}  {n['path']}{cls}")
    return "\n".join(lines)


SHEET_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def sheet_format(path: Path) -> str:
    """The image format a contact sheet's suffix names (PNG or JPEG); InputError otherwise."""
    fmt = SHEET_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: a contact sheet is written as .png, .jpg or .jpeg")
    return fmt


def check_tile(tile: int) -> None:
    if tile < 8:
        raise InputError(f"--tile must be >= 8 pixels, got {tile}")


def check_outputs(out: Path | None, sheet: Path | None, tile: int, search: bool,
                  baselines: bool = False) -> None:
    """`knn`'s options and output paths, before any work: --sheet only with --query, of a
    format it writes, --baselines only without it, --tile of at least 8 pixels, and a file can
    be made at --out and --sheet (`check_writable`: a missing folder is an InputError, one that
    refuses a file exit 4)."""
    check_tile(tile)
    if baselines and search:
        raise InputError("--baselines compares kNN accuracy on --shards; it does not go with "
                         "--query")
    if sheet is not None:
        if not search:
            raise InputError("--sheet needs --query")
        sheet_format(sheet)
        check_writable(sheet, "contact sheet")
    if out is not None:
        check_writable(out, "results")


def sheet_rows(hits: list[QueryHits], tile: int) -> list[list[tuple[Image.Image, str]]]:
    """Per query: the query captioned with its file name (shortened to fit the tile), then its
    neighbours captioned with their similarity and, from labeled shards, their class (shortened
    to fit)."""
    def caption(n: dict[str, Any]) -> str:
        sim = f"{n['similarity']:.3f}"
        if n.get("class") is None:
            return sim
        return fit_caption(f"{sim} {n['class']}", tile - 2, keep=len(sim) + 2)

    return [[(h.image, fit_caption(h.query.name, tile - 2)),
             *((t, caption(n)) for t, n in zip(h.thumbs, h.neighbours, strict=True))]
            for h in hits]


def write_sheet(hits: list[QueryHits], path: Path, tile: int) -> tuple[int, int]:
    """The contact sheet (PNG or JPEG, as `path`'s suffix says) of `sheet_rows`. Returns its
    (width, height)."""
    fmt = sheet_format(path)
    check_tile(tile)
    sheet = contact_sheet(sheet_rows(hits, tile), tile)
    save_image(sheet, path, fmt)
    return sheet.size


def _banks(bank: Path | Sequence[Path] | None) -> list[Path]:
    """--bank given once (a bank) or once per part of a node-local bank."""
    return [] if bank is None else [bank] if isinstance(bank, Path) else list(bank)


def _bank_name(bank: Path | Sequence[Path] | None) -> str | list[str] | None:
    banks = _banks(bank)
    return None if not banks else str(banks[0]) if len(banks) == 1 else [str(b) for b in banks]
