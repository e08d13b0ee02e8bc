"""Evaluation tools: `oocid knn` (per-class, confusion, several k, --recompute, --query search
and contact sheet), `oocid embed`, `oocid export`.

One tiny training (96 grayscale 16x16 images, 4 classes, 1 epoch) gives the checkpoint and
bank. Exact answers come from hand-built inputs: a hand-made top-k for the scores, a bank
written from the training images' own features for the search. The `oocid` processes (bad
inputs and one search end to end) start in the background as soon as the checkpoint exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config, tiny_npz
from PIL import Image
from torch import Tensor
from typer.testing import CliRunner

from oocid.bank.create import create_store, write_rows
from oocid.bank.store import open_store
from oocid.checkpoint import load_checkpoint, model_from_checkpoint
from oocid.cli.app import app
from oocid.cli.knn import run_knn, run_search, write_sheet
from oocid.config import config_from_dict
from oocid.data.eval_data import eval_batches, extract_features
from oocid.data.manifest import read_manifest
from oocid.data.reader import iter_samples
from oocid.data.writer import write_shards
from oocid.errors import DataError, InputError
from oocid.eval.embed import embed_shards
from oocid.eval.evaluate import confusion_matrix, knn_report, per_class_top1, read_labels
from oocid.eval.export import export_checkpoint, pre_fc
from oocid.eval.retrieval import sheet_size, source_path, topk_indexed
from oocid.method.knn import topk_accuracy, weighted_knn
from oocid.models import ARCHS, SmallConvNet, build_model
from oocid.train.loop import train

ENV = {k: v for k, v in os.environ.items() if k != "OOCID_DEBUG"}
ENV["OMP_NUM_THREADS"] = "1"  # the processes run beside the in-process tests
QUERY_INDEX = 37  # a training sample (in shard-000001.tar) used as a query
CPU = torch.device("cpu")


@dataclass
class Run:
    args: list[str]
    rc: int
    out: str
    err: str


def oocid(*args: object) -> Run:
    argv = [str(a) for a in args]
    p = subprocess.run([sys.executable, "-m", "oocid", *argv], capture_output=True, text=True,
                       env=ENV, timeout=120, check=False)
    return Run(argv, p.returncode, p.stdout, p.stderr)


def foreign_bank(bank: Path, out: Path) -> None:
    """A copy of `bank` with another id: as another run's bank of the same shards and step."""
    shutil.copytree(bank, out)
    meta = json.loads((out / "oocid.json").read_text())
    meta["bank_id"] = "0123456789abcdef"
    (out / "oocid.json").write_text(json.dumps(meta))


@dataclass
class Trained:
    d: Path
    train: Path
    val: Path
    bank: Path
    ckpt: Path
    query: Path  # training sample QUERY_INDEX, its stored PNG bytes
    query_dir: Path  # the query again plus an RGB image of another size
    jobs: dict[str, Future[Run]]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread here: the `oocid` processes run beside these tests, and OpenMP
    threads that outnumber the cores spin (a resnet50 forward took 3x as long)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    d = tmp_path_factory.mktemp("eval")
    tr, va = d / "train", d / "val"
    write_shards(tiny_npz(d / "tiny.npz"), tr, shard_size=32, seed=0, progress=False)
    write_shards(tiny_npz(d / "val.npz", n=40, seed=1), va, shard_size=32, progress=False)
    cfg = tiny_config()
    cfg.optim.epochs = 1
    train(cfg, tr, d / "bank.zarr", d / "run", progress=False, log=lambda m: None)
    sample = next(s for s in iter_samples(tr / "shard-000001.tar") if s.index == QUERY_INDEX)
    query = d / "q37.png"
    query.write_bytes(sample.image)
    qdir = d / "queries"
    (qdir / "sub").mkdir(parents=True)
    (qdir / "sub" / "a.png").write_bytes(sample.image)
    Image.new("RGB", (24, 20), (10, 200, 30)).save(qdir / "b.png")
    (d / "bad.png").write_text("not an image\n")
    mixed = d / "mixed"  # a good query and a truncated JPEG (the first half of one)
    mixed.mkdir()
    (mixed / "good.png").write_bytes(sample.image)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "whole.jpg", quality=95)
    whole = (d / "whole.jpg").read_bytes()
    (mixed / "trunc.jpg").write_bytes(whole[:len(whole) // 2])
    broken = d / "broken"
    broken.mkdir()
    shutil.copy(mixed / "trunc.jpg", broken / "trunc.jpg")
    unlabeled = d / "unlabeled"
    np.savez(d / "u.npz", images=np.random.default_rng(2).integers(0, 256, (20, 16, 16),
                                                                   dtype=np.uint8))
    write_shards(d / "u.npz", unlabeled, shard_size=32, progress=False)
    (d / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(2048))
    create_store(d / "other.zarr", 96, 128, chunk_rows=32,
                 manifest_id=read_manifest(va).identity).close()
    foreign_bank(d / "bank.zarr", d / "foreign.zarr")
    shutil.copytree(d / "bank.zarr", d / "holed.zarr")
    (d / "holed.zarr" / "c.1.0").unlink()  # a deleted chunk file: never read as zeros
    ckpt = d / "run" / "last.pt"
    pool = ThreadPoolExecutor(max_workers=2)
    cmds = {
        "search": ["knn", "--bank", d / "bank.zarr", "--checkpoint", ckpt, "--query", query,
                   "--query", qdir, "--k", 4, "--sheet", d / "sheet.png", "--tile", 40,
                   "--out", d / "search.json", "--device", "cpu"],
        "bad-query": ["knn", "--bank", d / "bank.zarr", "--checkpoint", ckpt, "--query",
                      d / "bad.png", "--device", "cpu"],
        "mixed-query": ["knn", "--bank", d / "bank.zarr", "--checkpoint", ckpt, "--query",
                        mixed, "--k", 3, "--sheet", d / "sheet.jpg", "--device", "cpu"],
        "named-trunc": ["knn", "--bank", d / "bank.zarr", "--checkpoint", ckpt, "--query",
                        mixed / "trunc.jpg", "--device", "cpu"],
        "no-readable": ["knn", "--bank", d / "bank.zarr", "--checkpoint", ckpt, "--query",
                        broken, "--device", "cpu"],
        "sheet-txt": ["knn", "--bank", d / "bank.zarr", "--checkpoint", ckpt, "--query", query,
                      "--sheet", d / "s.txt", "--device", "cpu"],
        "unlabeled-val": ["knn", "--bank", d / "bank.zarr", "--checkpoint", ckpt, "--shards",
                          unlabeled, "--device", "cpu"],
        "garbage-checkpoint": ["embed", "--checkpoint", d / "garbage.pt", "--shards", va,
                               "--out", d / "g.npy", "--device", "cpu"],
        "other-bank": ["knn", "--bank", d / "other.zarr", "--checkpoint", ckpt, "--shards", va,
                       "--device", "cpu"],
        "foreign-bank": ["knn", "--bank", d / "foreign.zarr", "--checkpoint", ckpt, "--shards",
                         va, "--device", "cpu"],
        "missing-chunk": ["knn", "--bank", d / "holed.zarr", "--checkpoint", ckpt, "--shards",
                          va, "--device", "cpu"],
    }
    jobs = {name: pool.submit(oocid, *args) for name, args in cmds.items()}
    yield Trained(d, tr, va, d / "bank.zarr", ckpt, query, qdir, jobs)
    pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------ pure scoring


def test_confusion_and_per_class_exact() -> None:
    pred, target = torch.tensor([0, 2, 2, 1, 0]), torch.tensor([0, 2, 1, 1, 0])
    conf = confusion_matrix(pred, target, 4)
    assert conf.tolist() == [[2, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert per_class_top1(conf) == [1.0, 0.5, 1.0, None]


def test_knn_report_hand_built_topk() -> None:
    """t = 1: query 0 (class 0) has neighbours of classes 1, 0, 0 with sims .9 .8 .7: k=1
    says 1; k=3 says 0 (e^.8 + e^.7 > e^.9). Query 1 (class 2): 2, 2, 1: right at both."""
    sims = torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.5, 0.4]])
    nl = torch.tensor([[1, 0, 0], [2, 2, 1]])
    y = torch.tensor([0, 2])
    r1 = knn_report(sims, nl, y, 1, 1.0, ["a", "b", "c"])
    r3 = knn_report(sims, nl, y, 3, 1.0, ["a", "b", "c"])
    assert (r1["top1"], r3["top1"]) == (0.5, 1.0)
    assert r1["confusion"] == [[0, 1, 0], [0, 0, 0], [0, 0, 1]]
    assert r3["confusion"] == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert [p["top1"] for p in r1["per_class"]] == [0.0, None, 1.0]
    assert [(p["class"], p["n"]) for p in r3["per_class"]] == [("a", 1), ("b", 0), ("c", 1)]
    assert "top5" not in r1 and (r1["k"], r3["k"]) == (1, 3)  # 3 classes: top-5 is always 1
    r9 = knn_report(sims, nl, y, 9, 1.0, ["a", "b", "c"])
    assert r9["k"] == 3 and r9["top1"] == r3["top1"]  # k beyond the rows: all 3 used, and said
    six = knn_report(sims, nl, y, 3, 1.0, ["a", "b", "c", "d", "e", "f"])
    assert six["top5"] == 1.0


def test_topk_indexed_chunks_in_any_order() -> None:
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    q = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    perm = torch.randperm(50, generator=g)
    chunks = [(perm[a:a + 7], bank[perm[a:a + 7]]) for a in range(0, 50, 7)]
    sims, index = topk_indexed(q, chunks, 5)
    want_s, want_i = (q @ bank.t()).topk(5, dim=1)
    assert torch.equal(index, want_i)
    assert torch.allclose(sims, want_s)


def test_topk_indexed_passes_a_chunk_sources_error_through() -> None:
    """Only an empty stream is "no training features"; a source that fails (a ValueError of a
    damaged chunk) is not reworded into it."""
    q = F.normalize(torch.randn(3, 4), dim=1)

    def failing() -> Iterator[tuple[Tensor, Tensor]]:
        raise ValueError("cannot reshape array of size 250")
        yield torch.arange(2), q[:2]

    with pytest.raises(ValueError, match="cannot reshape"):
        topk_indexed(q, failing(), 2)
    with pytest.raises(DataError, match="no training features to search"):
        topk_indexed(q, iter([]), 2)


def test_topk_indexed_consecutive_chunks_out_of_order() -> None:
    """Chunks of consecutive indices (a bank's) are mapped back without an index map; a mix with
    scattered chunks falls back to one."""
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(90, 8, generator=g), dim=1)
    q = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    want_s, want_i = (q @ bank.t()).topk(12, dim=1)
    spans = [(40, 65), (0, 13), (65, 90), (13, 40)]
    chunks = [(torch.arange(a, b), bank[a:b]) for a, b in spans]
    sims, index = topk_indexed(q, chunks, 12)
    assert torch.equal(index, want_i)
    assert torch.allclose(sims, want_s)
    mixed = [*chunks[:2], (torch.arange(89, 64, -1), bank[65:90].flip(0)), chunks[3]]
    assert torch.equal(topk_indexed(q, mixed, 12)[1], want_i)


# ------------------------------------------------------------------------------ knn


def test_knn_several_k_in_one_pass(trained: Trained) -> None:
    both = run_knn(trained.bank, trained.ckpt, trained.val, None, [10, 3], 0.07, "cpu")
    one = run_knn(trained.bank, trained.ckpt, trained.val, None, 3, 0.07, "cpu")
    assert both["ks"] == [3, 10] and both["k"] == 10 and both["features"] == "memory bank"
    assert both["by_k"]["3"] == one["by_k"]["3"]
    assert both["top1"] == both["by_k"]["10"]["top1"]
    for r in both["by_k"].values():
        conf = np.array(r["confusion"])
        assert conf.shape == (4, 4) and conf.sum() == 40
        assert np.trace(conf) / 40 == pytest.approx(r["top1"])
        assert [p["n"] for p in r["per_class"]] == conf.sum(axis=1).tolist()


def test_a_k_above_the_smallest_class_is_noted(trained: Trained,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """96 training images in 4 classes of 24: k 10 votes within a class's size, k 30 cannot."""
    capsys.readouterr()
    run_knn(trained.bank, trained.ckpt, trained.val, None, [10, 3], 0.07, "cpu")
    assert "note" not in capsys.readouterr().err
    run_knn(trained.bank, trained.ckpt, trained.val, None, 30, 0.07, "cpu")
    assert capsys.readouterr().err.splitlines() == [
        "oocid: note: k 30 is more than the 24 training images of the smallest class; a smaller "
        "--k may suit this set (the paper's 200 is for ImageNet's ~1,300 a class)"]


def test_knn_warns_when_bank_and_checkpoint_steps_differ(trained: Trained, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    run_knn(trained.bank, trained.ckpt, trained.val, None, 3, 0.07, "cpu")
    assert "warning" not in capsys.readouterr().err  # the bank's step is the checkpoint's
    bank = tmp_path / "ahead.zarr"
    shutil.copytree(trained.bank, bank)
    with open_store(bank) as store:
        step = store.meta.committed_step
        store._set_meta(committed_step=step + 5)
    run_knn(bank, trained.ckpt, trained.val, None, 3, 0.07, "cpu")
    err = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(err) == 1 and f"step {step + 5}" in err[0] and f"step {step})" in err[0], err
    assert "5 steps ahead of the checkpoint" in err[0] and "writing" not in err[0], err
    with open_store(bank) as store:
        store._set_meta(committed_step=step - 3)
    run_knn(bank, trained.ckpt, trained.val, None, 3, 0.07, "cpu")
    err = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(err) == 1 and "3 steps behind the checkpoint" in err[0], err


def test_knn_refuses_another_runs_bank_of_the_same_shards_and_step(trained: Trained,
                                                                   tmp_path: Path) -> None:
    """The checkpoint records the id of the bank it trained; a checkpoint of before the ids
    records none, and then any bank of its shards is used as before."""
    state = load_checkpoint(trained.ckpt)
    with open_store(trained.bank, read_only=True) as store:
        assert state["bank_id"] == store.meta.bank_id is not None
    foreign = trained.d / "foreign.zarr"
    with pytest.raises(DataError, match=f"{re.escape(str(foreign))}: is not the bank the "
                       f"checkpoint {re.escape(str(trained.ckpt))} trained"):
        run_knn(foreign, trained.ckpt, trained.val, None, 3, 0.07, "cpu")
    with pytest.raises(DataError, match="is not the bank the checkpoint"):
        run_search(foreign, trained.ckpt, [trained.query], None, 3, "cpu")
    del state["bank_id"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    assert run_knn(foreign, old, trained.val, None, 3, 0.07, "cpu")["top1"] == \
        run_knn(trained.bank, trained.ckpt, trained.val, None, 3, 0.07, "cpu")["top1"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_knn_stops_at_the_first_damaged_row(trained: Trained, tmp_path: Path, dtype: str
                                            ) -> None:
    """Rows are checked as they are scanned: a scaled or non-finite row is damage, named
    with the bank and suggesting `oocid bank verify`; a float16 bank's rounding is not."""
    bank = tmp_path / "b.zarr"
    with open_store(trained.bank, read_only=True) as src:
        rows = src.read_rows(0, src.n_rows)
        with create_store(bank, src.n_rows, src.dim, dtype=dtype, chunk_rows=src.chunk_rows,
                          manifest_id=src.meta.manifest_id, bank_id=src.meta.bank_id) as st:
            write_rows(st, 0, rows, step=src.meta.committed_step)
    good = run_knn(bank, trained.ckpt, trained.val, None, 3, 0.07, "cpu")
    assert good["top1"] > 0.5
    with open_store(bank) as st:
        write_rows(st, 40, rows[40:41] * 3)
    with pytest.raises(DataError, match=f"{re.escape(str(bank))}: row 40 has norm 3, not 1: "
                       r".*oocid bank verify"):
        run_knn(bank, trained.ckpt, trained.val, None, 3, 0.07, "cpu")


def test_knn_recompute_scores_fresh_training_features(trained: Trained) -> None:
    res = run_knn(None, trained.ckpt, trained.val, None, 5, 0.07, "cpu", recompute=True)
    assert res["features"] == "recomputed" and res["bank"] is None
    state = load_checkpoint(trained.ckpt)
    model = model_from_checkpoint(state, CPU, "ckpt")
    data = config_from_dict(state["config"], "ckpt").data
    tf, ti, _ = extract_features(model, eval_batches(read_manifest(trained.train), data, CPU))
    vf, _, vl = extract_features(model, eval_batches(read_manifest(trained.val), data, CPU))
    labels = torch.from_numpy(read_labels(read_manifest(trained.train)))
    scores = weighted_knn(vf, tf[ti.argsort()], labels, 5, 0.07, 4)
    assert res["top1"] == topk_accuracy(scores, vl, (1,))[1]


# ------------------------------------------------------------------------------ search


def test_query_of_a_training_image_finds_itself_recomputed(trained: Trained) -> None:
    meta, hits = run_search(None, trained.ckpt, [trained.query], None, 5, "cpu", recompute=True)
    assert meta["features"] == "recomputed"
    first = hits[0].neighbours[0]
    tm = read_manifest(trained.train)
    raw = next(s for s in iter_samples(tm.root / "shard-000001.tar") if s.index == QUERY_INDEX)
    assert (first["index"], first["shard"], first["key"]) == (QUERY_INDEX, "shard-000001.tar",
                                                               f"{QUERY_INDEX:09d}")
    assert first["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert first["path"] == source_path(tm, raw.path) and first["label"] == raw.label
    sims = [n["similarity"] for n in hits[0].neighbours]
    assert sims == sorted(sims, reverse=True) and len(sims) == 5


def test_query_against_a_bank_of_own_features(trained: Trained) -> None:
    """A converged bank, hand-made: each row the training image's own feature (from `embed`),
    so the search is exact: the query itself first at ~1, then the brute-force order."""
    res = embed_shards(trained.ckpt, trained.train, trained.d / "own.npy", device_name="cpu")
    feats = np.load(trained.d / "own.npy")
    assert np.array_equal(np.load(trained.d / "own.index.npy"), np.arange(96)) and res.rows == 96
    bank = trained.d / "own.zarr"
    with create_store(bank, 96, 128, chunk_rows=32,
                      manifest_id=read_manifest(trained.train).identity,
                      bank_id=load_checkpoint(trained.ckpt)["bank_id"]) as st:
        write_rows(st, 0, feats)
    meta, hits = run_search(bank, trained.ckpt, [trained.query, trained.query_dir], None, 6, "cpu")
    assert meta["features"] == "memory bank" and len(hits) == 3  # file + folder of 2
    assert [h.query.name for h in hits] == ["q37.png", "b.png", "a.png"]  # folder: sorted paths
    for h in (hits[0], hits[2]):
        assert h.neighbours[0]["index"] == QUERY_INDEX
        assert h.neighbours[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
        want = np.argsort(-(feats @ feats[QUERY_INDEX]), kind="stable")[:6]
        assert [n["index"] for n in h.neighbours][1:] == want.tolist()[1:]
    size = write_sheet(hits, trained.d / "s.png", 32)
    with Image.open(trained.d / "s.png") as im:
        assert im.size == size == sheet_size(3, 7, 32) and im.format == "PNG"


# ------------------------------------------------------------------------------ embed


def test_embed_order_and_formats(trained: Trained) -> None:
    npy, npz = trained.d / "v.npy", trained.d / "v.npz"
    embed_shards(trained.ckpt, trained.val, npy, device_name="cpu")
    embed_shards(trained.ckpt, trained.val, npz, device_name="cpu", pre_fc=True, batch_size=7)
    f, idx, lab = (np.load(trained.d / f"v{s}.npy") for s in ("", ".index", ".labels"))
    assert f.shape == (40, 128) and f.dtype == np.float32
    assert np.array_equal(idx, np.arange(40))
    assert np.array_equal(lab, read_labels(read_manifest(trained.val)))
    assert np.allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    model = model_from_checkpoint(load_checkpoint(trained.ckpt), CPU, "ckpt")
    ref, ri, _ = extract_features(model, eval_batches(read_manifest(trained.val),
                                                      tiny_config().data, CPU))
    assert np.allclose(f[ri.numpy()], ref.numpy(), atol=1e-5)
    with np.load(npz) as z:  # no pickled objects: np.load's default allow_pickle=False
        assert sorted(z.files) == ["classes", "features", "index", "labels"]
        assert z["features"].shape == (40, 128) and np.array_equal(z["index"], idx)
        assert not np.allclose(np.linalg.norm(z["features"], axis=1), 1.0)  # pre-fc: raw
        assert z["classes"].tolist() == list(read_manifest(trained.val).classes or ())
        assert len(z["classes"]) == 4
    embed_shards(trained.ckpt, trained.d / "unlabeled", npz, device_name="cpu")
    with np.load(npz) as z:  # unlabeled: no class names, every label -1
        assert sorted(z.files) == ["features", "index", "labels"]
        assert z["features"].shape == (20, 128) and (z["labels"] == -1).all()
    with pytest.raises(InputError, match="npz"):
        embed_shards(trained.ckpt, trained.val, trained.d / "v.txt")


# ------------------------------------------------------------------------------ export


def _documented_model(arch: str, channels: int, head_dim: int | None) -> torch.nn.Module:
    """Built exactly as `oocid export --help` says, independently of oocid.eval.export."""
    import torchvision

    if arch == "small":
        m: torch.nn.Module = SmallConvNet(channels, out_dim=head_dim or 128)
    else:
        m = getattr(torchvision.models, "resnet50" if arch == "resnet50" else "resnet18")(
            **({"num_classes": head_dim} if head_dim else {}))
        if arch == "cifar_resnet18":
            m.conv1 = torch.nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
            m.maxpool = torch.nn.Identity()  # type: ignore[assignment]
        elif channels != 3:
            m.conv1 = torch.nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    if head_dim is None:
        m.fc = torch.nn.Identity()
    return m.eval()


@pytest.mark.parametrize(("arch", "channels", "head"),
                         [("small", 1, False), ("small", 3, True), ("resnet18", 1, False),
                          ("resnet50", 3, False), ("cifar_resnet18", 1, True)])
def test_export_loads_strictly_and_matches(tmp_path: Path, arch: str, channels: int,
                                           head: bool) -> None:
    assert arch in ARCHS
    torch.manual_seed(0)
    model = build_model(arch, channels, 128).eval()
    for mod in model.modules():  # non-trivial BN statistics, so buffers must travel too
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    ckpt = tmp_path / "c.pt"
    torch.save({"format": "oocid-checkpoint", "arch": arch, "in_channels": channels, "dim": 128,
                "model": model.state_dict()}, ckpt)
    info = export_checkpoint(ckpt, tmp_path / "b.pt", arch=arch, head=head)
    sd = torch.load(tmp_path / "b.pt", weights_only=True)
    assert any(k.startswith("fc.") for k in sd) == head
    ref = _documented_model(arch, channels, 128 if head else None)
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(1, channels, 16, 16)  # small: the forward passes are most of the time
    pooled: list[torch.Tensor] = []
    hook = model.backbone.fc.register_forward_hook(lambda m, i, o: pooled.append(i[0]))
    with torch.no_grad():
        emb, got = model(x), ref(x)
    hook.remove()
    want = model.backbone.fc(pooled[0]) if head else pooled[0]  # (1, F)
    assert got.shape == (1, info.feature_dim)
    assert torch.allclose(got, want, atol=1e-5)
    if head:
        assert torch.allclose(F.normalize(got, dim=1), emb, atol=1e-5)


def test_export_refuses_other_architecture(tmp_path: Path) -> None:
    ckpt = tmp_path / "c.pt"
    torch.save({"format": "oocid-checkpoint", "arch": "small", "in_channels": 1, "dim": 128,
                "model": build_model("small", 1).state_dict()}, ckpt)
    with pytest.raises(DataError, match=r"'small' checkpoint, not 'resnet50'"):
        export_checkpoint(ckpt, tmp_path / "b.pt", arch="resnet50")
    assert not (tmp_path / "b.pt").exists()


# ------------------------------------------------------------------------------ the command


def test_cli_knn_embed_export(trained: Trained) -> None:
    runner, d = CliRunner(), trained.d
    r = runner.invoke(app, ["knn", "--checkpoint", str(trained.ckpt), "--shards",
                            str(trained.val), "--k", "3", "--k", "10", "--recompute", "--out",
                            str(d / "knn.json"), "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads((d / "knn.json").read_text())
    assert res["features"] == "recomputed" and sorted(res["by_k"]) == ["10", "3"]
    assert len(res["confusion"]) == 4 and "per-class top-1 (k=10): c0 " in r.output
    assert r.output.count("recomputed)") == 2
    r = runner.invoke(app, ["embed", "--checkpoint", str(trained.ckpt), "--shards",
                            str(trained.train), "--out", str(d / "t.npz"), "--no-progress"])
    assert r.exit_code == 0 and "96 x 128" in r.output, r.output
    r = runner.invoke(app, ["export", "--checkpoint", str(trained.ckpt), "--out",
                            str(d / "bb.pt"), "--arch", "small"])
    assert r.exit_code == 0 and "SmallConvNet(1); m.fc = nn.Identity()" in r.output, r.output
    r = runner.invoke(app, ["linear", "--checkpoint", str(trained.ckpt), "--train-shards",
                            str(trained.train), "--val-shards", str(trained.val), "--epochs", "2",
                            "--out", str(d / "lin.json"), "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0 and "backbone unchanged" in r.output, r.output
    assert "top-5" not in r.output and ", 2 epochs; " in r.output  # 4 classes: top-5 always 1
    assert json.loads((d / "lin.json").read_text())["epochs"] == 2
    r = runner.invoke(app, ["knn", "--checkpoint", str(trained.ckpt), "--bank", str(trained.bank),
                            "--shards", str(trained.val), "--query", str(trained.query)])
    assert isinstance(r.exception, InputError)


def test_cli_search_end_to_end(trained: Trained) -> None:
    run = trained.jobs["search"].result()
    assert run.rc == 0 and "Traceback" not in run.out + run.err, run
    res = json.loads((trained.d / "search.json").read_text())
    assert res["features"] == "memory bank" and res["k"] == 4
    assert [len(q["neighbours"]) for q in res["queries"]] == [4, 4, 4]
    assert {"similarity", "index", "shard", "key", "path"} <= set(res["queries"][0]["neighbours"][0])
    assert "query 1/3: " in run.out and "shard-0000" in run.out
    with Image.open(trained.d / "sheet.png") as im:
        assert im.size == sheet_size(3, 5, 40)


@pytest.mark.parametrize(("name", "code", "pattern"),
                         [("bad-query", 2, r"bad\.png: not a readable image"),
                          ("named-trunc", 2,
                           r"trunc\.jpg: not a readable image \(image file is truncated"),
                          ("sheet-txt", 2, r"s\.txt: a contact sheet is written as \.png, "),
                          ("unlabeled-val", 2, r"unlabeled: validation shards are unlabeled"),
                          ("garbage-checkpoint", 3, r"garbage\.pt"),
                          ("other-bank", 3, r"other\.zarr: belongs to other shards"),
                          ("foreign-bank", 3, r"foreign\.zarr: is not the bank the checkpoint "
                                              r"\S*last\.pt trained"),
                          ("missing-chunk", 3, r"holed\.zarr/c\.1\.0: the bank's chunk file is "
                                               "missing")])
def test_cli_bad_inputs(trained: Trained, name: str, code: int, pattern: str) -> None:
    run = trained.jobs[name].result()
    assert run.rc == code, run
    assert "Traceback" not in run.out + run.err, run
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), run


def test_cli_search_skips_an_unreadable_image_of_a_folder(trained: Trained) -> None:
    """A truncated JPEG in a --query folder: one warning line with Pillow's reason, the other
    image searched; --sheet s.jpg is a JPEG."""
    run = trained.jobs["mixed-query"].result()
    assert run.rc == 0 and "Traceback" not in run.out + run.err, run
    trunc = trained.d / "mixed" / "trunc.jpg"
    warned = [ln for ln in run.err.splitlines() if "trunc.jpg" in ln]
    assert len(warned) == 1 and re.fullmatch(
        rf"oocid: warning: skipped {re.escape(str(trunc))}: image file is truncated "
        r"\(\d+ bytes not processed\)", warned[0]), run
    assert "query 1/1: " in run.out and "good.png" in run.out, run
    with Image.open(trained.d / "sheet.jpg") as im:
        assert im.format == "JPEG" and im.size == sheet_size(1, 4, 96)


def test_cli_search_of_a_folder_without_a_readable_image_is_an_error(trained: Trained) -> None:
    run = trained.jobs["no-readable"].result()
    assert run.rc == 2 and "Traceback" not in run.out + run.err and run.out == "", run
    warning, error = run.err.strip().splitlines()
    assert warning.startswith(f"oocid: warning: skipped {trained.d / 'broken' / 'trunc.jpg'}: "
                              "image file is truncated"), run
    assert error == (f"oocid: error: {trained.d / 'broken'}: no readable query images (1 skipped, "
                     "each named above)"), run


# ------------------------------------------------------------------------------ linear probe


def test_default_probe_epochs_give_small_sets_enough_steps() -> None:
    """20 epochs stay the default where they give 2,000 steps or more; a small set gets as many
    as give 2,000 (scikit-learn's digits: 1,400 images, 6 steps an epoch)."""
    import oocid.eval.linear as lin

    assert lin.default_epochs(1_281_167, 256) == 20  # ImageNet: 100,000 steps
    assert lin.default_epochs(25_600, 256) == 20
    assert lin.default_epochs(10_000, 256) == 50  # 40 steps an epoch
    assert lin.default_epochs(1_400, 256) == 334
    assert lin.default_epochs(96, 32) == 667


def test_default_probe_epochs_fit_what_20_epochs_underfit() -> None:
    """1,400 unit-norm features of 10 noisy class centres: 20 epochs of batch 256 (120 Adam
    steps) leave the classifier short of the training set; the default fits it."""
    import oocid.eval.linear as lin

    rng = np.random.default_rng(0)
    centres, y = rng.normal(size=(10, 128)), rng.integers(0, 10, 1400)
    x = (centres[y] + 3.0 * rng.normal(size=(1400, 128))).astype(np.float32)
    train_top1 = {}
    for epochs in (20, None):
        clf, _ = lin.fit_linear(x, y, 10, lin.ProbeConfig(epochs=epochs), CPU)
        train_top1[epochs] = lin.accuracy(clf, x, y, CPU)[1]
    assert train_top1[20] < 0.97 and train_top1[None] > 0.99, train_top1


@pytest.mark.parametrize(("probe", "message"), [
    ({"epochs": 0}, "--epochs must be >= 1, got 0"),
    ({"batch_size": -2}, "--batch-size must be >= 1, got -2"),
    ({"lr": 0.0}, "--lr must be > 0, got 0.0")])
def test_a_bad_probe_setting_is_named_alone(trained: Trained, probe: dict[str, object],
                                            message: str) -> None:
    import oocid.eval.linear as lin

    with pytest.raises(InputError) as e:
        lin.linear_eval(trained.ckpt, trained.train, trained.val, probe=lin.ProbeConfig(**probe))
    assert str(e.value) == message


def test_linear_probe_and_frozen_backbone(trained: Trained, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    import oocid.eval.linear as lin

    probe = lin.ProbeConfig(epochs=15, lr=0.05, batch_size=32)
    res = lin.linear_eval(trained.ckpt, trained.train, trained.val, probe=probe, device_name="cpu")
    model = model_from_checkpoint(load_checkpoint(trained.ckpt), CPU, "ckpt")
    assert res["backbone_sha256"] == lin.state_hash(pre_fc(model))
    assert res["features"].startswith("pre-fc backbone (128-d")
    assert (res["train_samples"], res["val_samples"], res["classes"]) == (96, 40, 4)
    assert res["loss_last_epoch"] < 0.8 * res["loss_first_epoch"]
    assert res["top1"] > 0.5 and res["top5"] == 1.0  # 4 classes; chance is 0.25

    real = lin.write_features

    def tampering(net: torch.nn.Module, *args: object, **kw: object) -> object:
        out = real(net, *args, **kw)  # type: ignore[arg-type]
        with torch.no_grad():
            next(net.parameters()).add_(1.0)  # as if the probe had trained the backbone
        return out

    monkeypatch.setattr(lin, "write_features", tampering)
    with pytest.raises(DataError, match="backbone changed"):
        lin.linear_eval(trained.ckpt, trained.train, trained.val, probe=probe, device_name="cpu")


def test_fit_linear_refuses_zero_epochs_and_takes_none_as_the_default() -> None:
    """The library call: epochs 0 is an error naming it (it was taken as the default by `or`);
    None is the default's count."""
    import oocid.eval.linear as lin

    feats = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    labels = np.arange(40) % 2
    with pytest.raises(ValueError, match="epochs must be >= 1 or None, got 0"):
        lin.fit_linear(feats, labels, 2, lin.ProbeConfig(epochs=0, batch_size=8), CPU)
    _, losses = lin.fit_linear(feats, labels, 2, lin.ProbeConfig(batch_size=8), CPU)
    assert len(losses) == lin.default_epochs(40, 8) == 400
