"""Validation classes matched to the training classes by name (`oocid.eval.classes`): a
validation set of fewer classes, or of the same classes in another order or Unicode form, is
scored by `knn`, `linear` and `train --val` exactly as the same images labeled as in training.

One tiny training (96 images, 4 classes c0-c3, 1 epoch) with `--val` of two of its classes;
the validation images (40, seed 1) come as the full set, as the images of c3 and c1 only
(labeled 0 and 1), and as the full set with its class list reversed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import tiny_config, tiny_npz
from typer.testing import CliRunner

from oocid.cli.app import app
from oocid.cli.knn import run_knn
from oocid.data.manifest import Manifest, read_manifest
from oocid.data.writer import write_shards
from oocid.errors import DataError
from oocid.eval.classes import class_map, training_labels
from oocid.eval.linear import ProbeConfig, linear_eval
from oocid.train.loop import train
from oocid.train.setup import check_val


@dataclass
class Sets:
    d: Path
    train: Path
    full: Path  # the validation images, classes c0-c3
    sub: Path  # those of c3 and c1, in that order
    rev: Path  # all of them, classes listed c3, c2, c1, c0
    bank: Path
    ckpt: Path
    metrics: list[dict[str, float]]


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> Sets:
    d = tmp_path_factory.mktemp("classes")
    write_shards(tiny_npz(d / "t.npz"), d / "train", shard_size=32, progress=False)
    for name, keep in (("full", None), ("sub", [3, 1]), ("rev", [3, 2, 1, 0])):
        write_shards(tiny_npz(d / f"{name}.npz", n=40, seed=1, keep=keep), d / name,
                     shard_size=32, progress=False)
    cfg = tiny_config()
    cfg.optim.epochs = 1
    train(cfg, d / "train", d / "bank.zarr", d / "run", val=d / "sub", progress=False,
          log=lambda m: None)
    metrics = [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    return Sets(d, d / "train", d / "full", d / "sub", d / "rev", d / "bank.zarr",
                d / "run" / "last.pt", metrics)


def knn(s: Sets, val: Path, ks: list[int]) -> dict[str, Any]:
    return run_knn(s.bank, s.ckpt, val, None, ks, tiny_config().train.knn_temperature, "cpu")


def test_knn_of_fewer_classes_is_the_full_sets_restricted_to_them(sets: Sets) -> None:
    full, sub = knn(sets, sets.full, [10, 200]), knn(sets, sets.sub, [10, 200])
    assert sub["queries"] == 20 and sub["classes"] == ["c0", "c1", "c2", "c3"]
    for k in ("10", "200"):
        f, s = full["by_k"][k], sub["by_k"][k]
        assert [p["class"] for p in s["per_class"]] == ["c1", "c3"]  # only the classes evaluated
        assert s["per_class"] == [f["per_class"][1], f["per_class"][3]]
        conf = np.array(s["confusion"])
        assert conf[[1, 3]].tolist() == np.array(f["confusion"])[[1, 3]].tolist()
        assert conf[[0, 2]].sum() == 0 and conf.sum() == 20
        assert s["top1"] == pytest.approx(np.trace(conf) / 20)


def test_knn_of_the_classes_listed_in_another_order_is_the_same(sets: Sets) -> None:
    full, rev = knn(sets, sets.full, [3, 10]), knn(sets, sets.rev, [3, 10])
    assert read_manifest(sets.rev).classes == ("c3", "c2", "c1", "c0")
    assert rev["by_k"] == full["by_k"]  # labels taken as they are would score another thing


def test_train_val_of_fewer_classes_is_what_knn_finds(sets: Sets) -> None:
    cfg = tiny_config()
    one = run_knn(sets.bank, sets.ckpt, sets.sub, None, [cfg.train.knn_k],
                  cfg.train.knn_temperature, "cpu")
    assert sets.metrics[-1]["knn_top1"] == one["top1"]


def test_linear_of_the_classes_in_another_order_is_the_same(sets: Sets) -> None:
    probe = ProbeConfig(epochs=2, batch_size=32)
    full = linear_eval(sets.ckpt, sets.train, sets.full, probe=probe, device_name="cpu")
    rev = linear_eval(sets.ckpt, sets.train, sets.rev, probe=probe, device_name="cpu")
    assert (rev["top1"], rev["top5"]) == (full["top1"], full["top5"])
    sub = linear_eval(sets.ckpt, sets.train, sets.sub, probe=probe, device_name="cpu")
    assert sub["val_samples"] == 20 and sub["classes"] == 4


def test_cli_knn_of_fewer_classes_lists_those(sets: Sets) -> None:
    r = CliRunner().invoke(app, ["knn", "--checkpoint", str(sets.ckpt), "--bank", str(sets.bank),
                                 "--shards", str(sets.sub), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("per-class"))
    assert re.fullmatch(r"per-class top-1 \(k=96\): c1 \d\.\d\d  c3 \d\.\d\d", line), line


# ------------------------------------------------------------------------------ matching


def named(m: Manifest, *classes: str) -> Manifest:
    return dataclasses.replace(m, classes=classes)


def test_names_match_in_any_unicode_form_and_order(sets: Sets) -> None:
    m = read_manifest(sets.full)
    tr = named(m, "cats", unicodedata.normalize("NFC", "dögs"), "with space")
    val = named(m, unicodedata.normalize("NFD", "dögs"), "cats")  # as macOS writes a folder
    assert class_map(tr, val, sets.full).tolist() == [1, 0]  # type: ignore[union-attr]
    assert class_map(tr, named(m, *tr.classes), sets.full).tolist() == [0, 1, 2]  # type: ignore[union-attr]
    assert class_map(tr, dataclasses.replace(m, classes=None), sets.full) is None
    labels = torch.tensor([0, 1, 1, -1])
    assert training_labels(labels, np.array([1, 0]), sets.full).tolist() == [1, 0, 0, -1]
    with pytest.raises(DataError, match="label 2 outside its 2 classes"):
        training_labels(torch.tensor([2]), np.array([1, 0]), sets.full)


def test_a_validation_class_not_in_training_is_named(sets: Sets) -> None:
    m = read_manifest(sets.full)
    tr = named(m, "c0", "c1")
    val = named(m, "c1", *[f"x{i}" for i in range(7)])
    msg = (f"{sets.full}: 7 of its 8 classes are not among the training shards' 2: 'x0', 'x1', "
           "'x2', 'x3', 'x4' and 2 more")
    with pytest.raises(DataError, match=re.escape(msg)):
        class_map(tr, val, sets.full)
    with pytest.raises(DataError, match=re.escape(msg)):  # train --val: before any training
        check_val(tr, val, sets.train, sets.full)
    check_val(tr, named(m, "c1"), sets.train, sets.full)  # fewer classes are fine


def test_a_name_two_training_classes_spell_differently_is_refused(sets: Sets) -> None:
    m = read_manifest(sets.full)
    nfc, nfd = unicodedata.normalize("NFC", "dögs"), unicodedata.normalize("NFD", "dögs")
    tr = named(m, nfc, nfd, "cats")
    assert class_map(tr, named(m, "cats"), sets.full).tolist() == [2]  # type: ignore[union-attr]
    with pytest.raises(DataError, match="one name in two Unicode forms"):
        class_map(tr, named(m, nfc), sets.full)
