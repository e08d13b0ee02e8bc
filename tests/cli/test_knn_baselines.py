"""`oocid knn --baselines`: after the result, a table of the learned features' top-1 next to the
network untrained, raw pixels and mean-centred pixels, and the same numbers in --out's JSON;
refused with --query before any work.

The commands run in this process through `main`, against one tiny training (96 images of 16 px,
4 classes, 1 epoch) and 48 validation images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import TinyRun, in_process, tiny_config, tiny_npz, tiny_run

from oocid.data.writer import write_shards
from oocid.train.loop import train

oocid = in_process
ROWS = ["same network, untrained", "raw pixels", "mean-centred pixels"]


Trained = TinyRun  # and 48 validation images at D/val


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    d = tmp_path_factory.mktemp("baselines")
    write_shards(tiny_npz(d / "v.npz", n=48, seed=1), d / "val", shard_size=32, progress=False)
    return tiny_run(d)


def knn(t: Trained, *args: object, val: str = "val") -> list[object]:
    return ["knn", "--checkpoint", t.run / "last.pt", "--bank", t.bank, "--shards", t.d / val,
            "--device", "cpu", "--no-progress", *args]


def test_baselines_print_a_table_and_write_them_to_the_json(
        trained: Trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = trained.d / "res.json"
    r = oocid(monkeypatch, capsys, *knn(trained, "--baselines", "--k", 5, "--k", 20, "--out", out))
    assert r.rc == 0, r
    res = json.loads(out.read_text())
    base = res["baselines"]
    assert sorted(base) == ["pixels", "pixels_centered", "untrained"]
    lines = r.out.splitlines()
    at = lines.index("baselines: weighted kNN (k=5, 20, t=0.07) on 48 validation images, 96 "
                     "training images:")
    assert lines[0].startswith("kNN top-1 ") and lines[at - 1].startswith("per-class top-1")
    assert lines[at + 1].split() == ["features", "k=5", "top-1", "k=20", "top-1"]  # 4 classes
    table = {ln[:42].strip(): ln[42:].split() for ln in lines[at + 2:at + 6]}
    assert list(table) == ["learned, memory bank as train features", *ROWS]
    learned = [f"{res['by_k'][k]['top1']:.4f}" for k in ("5", "20")]
    assert table["learned, memory bank as train features"] == learned
    for key, row in zip(("untrained", "pixels", "pixels_centered"), ROWS, strict=True):
        assert set(base[key]["by_k"]) == {"5", "20"} and "top5" not in base[key]
        assert base[key]["top1"] == base[key]["by_k"]["20"]["top1"]
        assert table[row] == [f"{base[key]['by_k'][k]['top1']:.4f}" for k in ("5", "20")]
        assert 0 < base[key]["top1"] <= 1
    best = max(base[key]["top1"] for key in base)
    assert (lines[at + 6:] != []) == (not res["top1"] > best), r  # the note, only then
    said = [ln for ln in r.err.splitlines() if ln.startswith("oocid: baselines: ")]
    assert len(said) == 3, r.err  # a line before each pass: untrained, raw pixels, centred


def test_recomputed_features_are_the_demos_learned_row_and_no_flag_no_table(
        trained: Trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    r = oocid(monkeypatch, capsys, *knn(trained, "--recompute", "--baselines"))
    assert r.rc == 0, r
    assert any(ln.startswith("  learned features (NPID)  ") for ln in r.out.splitlines()), r
    out = trained.d / "plain.json"
    r = oocid(monkeypatch, capsys, *knn(trained, "--recompute", "--out", out))
    assert r.rc == 0 and len(r.out.splitlines()) == 2 and "baselines" not in r.err, r
    assert "baselines" not in json.loads(out.read_text())


def test_baselines_with_query_are_refused_before_any_work(
        trained: Trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = trained.d / "no-such.pt"  # not read: refused before
    r = oocid(monkeypatch, capsys, "knn", "--checkpoint", missing, "--bank", trained.bank,
              "--query", trained.d / "v.npz", "--baselines", "--out", trained.d / "q.json")
    assert (r.rc, r.out, r.err) == (2, "", "oocid: error: --baselines compares kNN accuracy on "
                                    "--shards; it does not go with --query\n"), r
    assert not (trained.d / "q.json").exists()


def test_an_rgb_validation_set_for_a_grayscale_model_is_decoded_as_the_model_takes_it(
        trained: Trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same validation images stored as RGB (R = G = B) for the model trained on grayscale:
    decoded to grayscale as the model takes them (an internal error before), so every number,
    the learned features' and each baseline's, is that of the grayscale set; `embed` and
    `train --val` too."""
    with np.load(trained.d / "v.npz") as z:
        rgb = np.repeat(z["images"][..., None], 3, axis=-1)  # (N, H, W, 3)
        np.savez(trained.d / "v3.npz", images=rgb, **{k: z[k] for k in z.files if k != "images"})
    write_shards(trained.d / "v3.npz", trained.d / "val3", shard_size=32, progress=False)
    got = {}
    for name in ("val", "val3"):
        out = trained.d / f"{name}.json"
        r = oocid(monkeypatch, capsys, *knn(trained, "--baselines", "--out", out, val=name))
        assert r.rc == 0 and "error" not in r.err, r
        res = json.loads(out.read_text())
        got[name] = (res["top1"], {key: b["top1"] for key, b in res["baselines"].items()})
        e = oocid(monkeypatch, capsys, "embed", "--checkpoint", trained.run / "last.pt",
                  "--shards", trained.d / name, "--out", trained.d / f"{name}.npz",
                  "--device", "cpu", "--no-progress")
        assert e.rc == 0, e
    assert got["val3"] == got["val"]
    with np.load(trained.d / "val.npz") as a, np.load(trained.d / "val3.npz") as b:
        assert np.array_equal(a["features"], b["features"])
    cfg = tiny_config()  # and train --val's kNN check after an epoch
    cfg.optim.epochs, cfg.train.eval_every = 1, 1
    run = trained.d / "run-val3"
    train(cfg, trained.d / "train", trained.d / "bank-val3.zarr", run, val=trained.d / "val3",
          progress=False, log=lambda m: None)
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= rec["knn_top1"] <= 1.0
