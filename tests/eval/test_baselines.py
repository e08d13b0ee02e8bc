"""The baselines of `oocid knn --baselines` (oocid.eval.baselines): the pixel baselines against
an independent numpy computation and against `oocid demo`'s pixel path, the untrained network
against the demo's construction, and the table's rows and note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import tiny_config

from oocid.config import demo_config
from oocid.data.eval_data import eval_batches, extract_features
from oocid.data.manifest import Manifest
from oocid.data.memory import decode_all
from oocid.data.writer import write_shards
from oocid.demo import demo_data_path, pixel_features
from oocid.eval.baselines import (
    format_baselines,
    pixel_search,
    scored,
    untrained_model,
    untrained_search,
)
from oocid.eval.evaluate import knn_against, read_labels, tensor_chunks
from oocid.models import build_model

CPU = torch.device("cpu")


def noisy_npz(path: Path, n: int, seed: int, channels: int = 1, classes: int = 4) -> Path:
    """16 x 16 images whose class (a faint bar orientation) is buried in noise: pixels classify
    them well but not perfectly, so a wrong neighbour or weight shows in the top-1."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    yy, xx = np.mgrid[0:16, 0:16]
    bars = [(xx // 4) % 2, (yy // 4) % 2, ((xx + yy) // 4) % 2, ((xx - yy) // 4) % 2]
    shape = (16, 16) if channels == 1 else (16, 16, channels)
    images = np.stack([(bars[c] if channels == 1 else bars[c][..., None]) * 15
                       + rng.integers(0, 200, shape) for c in labels])
    np.savez(path, images=images.astype(np.uint8), labels=labels.astype(np.int64),
             class_names=np.array([f"c{i}" for i in range(classes)]))
    return path


def numpy_top1_hits(train: np.ndarray, ytr: np.ndarray, val: np.ndarray, yva: np.ndarray, k: int,
                    t: float, classes: int, center: bool) -> int:
    """Weighted kNN by hand: [0, 1] pixels, flattened, (minus the training mean image), L2,
    cosine, the k most similar, weights exp(s / t) summed per class, the largest wins."""
    tr = train.reshape(len(train), -1).astype(np.float64) / 255
    va = val.reshape(len(val), -1).astype(np.float64) / 255
    if center:
        mean = tr.mean(axis=0)
        tr, va = tr - mean, va - mean
    tr /= np.linalg.norm(tr, axis=1, keepdims=True)
    va /= np.linalg.norm(va, axis=1, keepdims=True)
    s = va @ tr.T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    w = np.exp(np.take_along_axis(s, idx, axis=1) / t)
    votes = np.zeros((len(va), classes))
    np.add.at(votes, (np.arange(len(va))[:, None], ytr[idx]), w)
    return int((votes.argmax(axis=1) == yva).sum())


def hits(res: dict[str, Any], queries: int) -> int:
    return round(res["top1"] * queries)


@pytest.mark.parametrize(("channels", "in_memory", "budget"), [
    (1, "yes", None), (1, "no", None), (3, "yes", None),
    (1, "yes", 4 * 256 * 10),  # 10 queries a pass, 10 training rows a GEMM: 7 passes
])
def test_pixel_baselines_equal_a_numpy_computation(tmp_path: Path, channels: int, in_memory: str,
                                                   budget: int | None) -> None:
    """Images of the config's size (the test transform is the identity): the top-1 at each k
    is the numpy computation's, raw and mean-centred, held in memory or streamed, in one pass
    or in many small ones."""
    tz, vz = noisy_npz(tmp_path / "t.npz", 160, 0, channels), noisy_npz(tmp_path / "v.npz", 64, 1,
                                                                        channels)
    tm = write_shards(tz, tmp_path / "train", shard_size=64, progress=False)
    vm = write_shards(vz, tmp_path / "val", shard_size=64, progress=False)
    cfg = tiny_config()
    cfg.data.in_memory = in_memory
    said: list[str] = []
    extra = {} if budget is None else {"budget": budget}
    raw, centred = pixel_search(tm, vm, cfg.data, CPU, 20, say=said.append, **extra)
    many = budget is not None  # 7 passes: above SLOW_PASSES, so a warning with the cost
    assert len(said) == 2 + many and ("7 passes" in said[0]) == many, said
    if many:
        assert said[1] == "oocid: warning: the pixel baselines read the 160 training images 14 " \
                          "times (7 passes each); a sample of the validation set as --shards " \
                          "(`oocid shard` of a few thousand images) takes one pass each", said
    t, v = np.load(tz), np.load(vz)
    assert (raw.sims.shape, centred.index.shape) == ((64, 20), (64, 20))
    labels = torch.from_numpy(read_labels(tm))
    got = {}
    for found, center in ((raw, False), (centred, True)):
        res = scored(found, labels, [5, 20], 0.07, 4)
        for k in (5, 20):
            want = numpy_top1_hits(t["images"], t["labels"], v["images"], v["labels"], k, 0.07, 4,
                                   center)
            assert 10 < want < 60  # neither chance nor perfect: a mistake would show
            got[center, k] = hits(res["by_k"][str(k)], 64)
            assert got[center, k] == want, (center, k)
    assert got[False, 20] != got[True, 20]  # the centring changes the answer here


def demo_subset(d: Path, n_train: int = 400, n_val: int = 100) -> tuple[Manifest, Manifest]:
    data = np.load(demo_data_path())
    npz = d / "demo_subset.npz"
    np.savez(npz, train_images=data["train_images"][:n_train],
             train_labels=data["train_labels"][:n_train],
             test_images=data["test_images"][:n_val], test_labels=data["test_labels"][:n_val],
             class_names=data["class_names"])
    return (write_shards(npz, d / "train", shard_size=128, seed=0, split="train", progress=False),
            write_shards(npz, d / "val", shard_size=128, seed=0, split="test", progress=False))


def test_pixel_baselines_agree_with_the_demos(tmp_path: Path) -> None:
    """On the demo's data, the demo's pixel path (decoded images, `pixel_features`) and the
    baselines' (test-transformed tensors un-normalised) give the same top-1."""
    tm, vm = demo_subset(tmp_path)
    cfg = demo_config()
    k, t = cfg.train.knn_k, cfg.train.knn_temperature
    labels = torch.from_numpy(read_labels(tm))
    raw, centred = pixel_search(tm, vm, cfg.data, CPU, k, say=lambda m: None)
    timgs, _, _ = decode_all(tm, 1)
    vimgs, vlab, _ = decode_all(vm, 1)
    mean = timgs.reshape(len(timgs), -1).astype(np.float32).mean(0) / 255.0

    def demo(center: np.ndarray | None) -> float:
        return knn_against(pixel_features(vimgs, center), torch.from_numpy(vlab),
                           lambda: tensor_chunks(pixel_features(timgs, center)), labels, k, t,
                           10)["top1"]

    assert scored(raw, labels, [k], t, 10)["top1"] == demo(None)
    assert scored(centred, labels, [k], t, 10)["top1"] == demo(mean)


def test_the_untrained_network_is_the_demos(tmp_path: Path) -> None:
    """The untrained model is the demo's construction (seed, then build_model), leaves the
    global random state alone, and its kNN top-1 is the one of the demo's features."""
    tm, vm = demo_subset(tmp_path, 300, 60)
    cfg = demo_config()
    torch.manual_seed(123)
    model = untrained_model(cfg.model.arch, 1, cfg.model.dim, cfg.train.seed, CPU)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))  # the global generator as it was
    torch.manual_seed(cfg.train.seed)  # as run_demo builds it
    demo_model = build_model(cfg.model.arch, 1, cfg.model.dim).eval()
    theirs = demo_model.state_dict()
    assert all(torch.equal(v, theirs[name]) for name, v in model.state_dict().items())

    found = untrained_search(model, tm, vm, cfg.data, False, CPU, 50, say=lambda m: None)
    tf, tidx, _ = extract_features(demo_model, eval_batches(tm, cfg.data, CPU))
    vf, _, vlab = extract_features(demo_model, eval_batches(vm, cfg.data, CPU))
    labels = torch.from_numpy(read_labels(tm))
    want = knn_against(vf, vlab, lambda: tensor_chunks(tf[tidx.argsort()]), labels, 50, 0.07, 10)
    got = scored(found, labels, [50], 0.07, 10)
    assert (got["top1"], got["top5"]) == (want["top1"], want["top5"])
    assert 0.1 < got["top1"] < 1  # features that do something, short of perfect


def _result(learned: float, pixels: float, ks: list[int], features: str = "memory bank"
            ) -> dict[str, Any]:
    def acc(top1: float) -> dict[str, Any]:
        return {"top1": top1, "top5": 0.99, "k": ks[-1],
                "by_k": {str(k): {"top1": top1, "top5": 0.99, "k": k} for k in ks}}

    return {**acc(learned), "ks": ks, "temperature": 0.07, "queries": 40, "bank_rows": 100,
            "features": features,
            "baselines": {"untrained": acc(0.3), "pixels": acc(pixels),
                          "pixels_centered": acc(pixels - 0.1)}}


def test_the_table_has_the_demos_rows_and_a_note_only_when_pixels_win() -> None:
    lines = format_baselines(_result(0.8, 0.9, [200])).splitlines()
    assert lines[0] == "baselines: weighted kNN (k=200, t=0.07) on 40 validation images, 100 " \
                       "training images:"
    assert lines[1].split() == ["features", "top-1", "top-5"]
    assert [ln[:42].strip() for ln in lines[2:6]] == [
        "learned, memory bank as train features", "same network, untrained", "raw pixels",
        "mean-centred pixels"]
    assert lines[2].split()[-2:] == ["0.8000", "0.9900"] and lines[4].split()[-2:] == [
        "0.9000", "0.9900"]
    assert lines[6] == "  note: learned top-1 0.8000 is below the best baseline (raw pixels, " \
                       "0.9000); try --recompute: it scores the network's features of the " \
                       "training images, not the bank's rows"
    assert len(lines) == 7
    recomputed = format_baselines(_result(0.8, 0.9, [200], "recomputed")).splitlines()
    assert recomputed[-1] == "  note: learned top-1 0.8000 is below the best baseline (raw " \
                             "pixels, 0.9000)"  # no hint: already the network's features
    several = format_baselines(_result(0.95, 0.9, [5, 200], "recomputed")).splitlines()
    assert several[1].split() == ["features", "k=5", "top-1", "k=5", "top-5", "k=200", "top-1",
                                  "k=200", "top-5"]
    assert several[2].startswith("  learned features (NPID) ") and len(several) == 6  # no note
    tie = format_baselines(_result(0.9, 0.9, [5, 200])).splitlines()
    assert tie[-1].startswith("  note: learned top-1 0.9000 only ties the best baseline "
                              "(raw pixels, 0.9000) at k=200; try --recompute")
    ceiling = format_baselines(_result(1.0, 1.0, [200]))
    assert "note" not in ceiling  # everything at 1: nothing to say


def test_two_ks_above_the_training_rows_are_one_column() -> None:
    """--k 200 --k 500 over 100 training rows both use k 100: one column, not two equal ones."""
    res = _result(0.95, 0.9, [200, 500])
    for by_k in [res["by_k"], *(b["by_k"] for b in res["baselines"].values())]:
        for k in ("200", "500"):
            by_k[k]["k"] = 100
    lines = format_baselines(res).splitlines()
    assert lines[0].startswith("baselines: weighted kNN (k=100, t=0.07) on 40 ")
    assert lines[1].split() == ["features", "top-1", "top-5"]
