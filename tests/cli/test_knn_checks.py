"""`oocid knn` checks its options and output paths before any work, and says what it did: a
checkpoint folder, k above the training rows with --query, the contact sheet's query captions.

The commands run in this process through `main` (one line on stderr, the exit code), against
one tiny training (96 images of 16 px, 4 classes, 1 epoch).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import Run, TinyRun, in_process, tiny_run
from PIL import Image, ImageDraw, ImageFont

from oocid.cli.knn import QueryHits, sheet_rows

Trained = TinyRun  # the query image is D/q.png


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    d = tmp_path_factory.mktemp("knn")
    run = tiny_run(d)
    Image.new("L", (16, 16), 90).save(d / "q.png")
    (d / "a-file").write_text("x")
    return run


oocid = in_process


def failed(r: Run, code: int, line: str) -> None:
    """Exit `code`, nothing on stdout (no work was done), and the one line `line` on stderr."""
    assert (r.rc, r.out, r.err) == (code, "", f"oocid: error: {line}\n"), r


def search(t: Trained, *args: object) -> list[object]:
    return ["knn", "--checkpoint", t.run / "last.pt", "--bank", t.bank, "--query", t.d / "q.png",
            "--device", "cpu", *args]


def classify(t: Trained, *args: object) -> list[object]:
    return ["knn", "--checkpoint", t.run / "last.pt", "--bank", t.bank, "--shards", t.train,
            "--device", "cpu", *args]


def test_outputs_in_a_missing_folder_are_refused_before_any_work(
        trained: Trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nodir = trained.d / "nodir"
    failed(oocid(monkeypatch, capsys, *search(trained, "--sheet", nodir / "s.png")), 2,
           f"{nodir}: no such directory")
    failed(oocid(monkeypatch, capsys, *classify(trained, "--out", nodir / "r.json")), 2,
           f"{nodir}: no such directory")
    failed(oocid(monkeypatch, capsys, *search(trained, "--out", nodir / "r.json")), 2,
           f"{nodir}: no such directory")
    assert not nodir.exists()


def test_an_output_below_a_file_is_exit_4_before_any_work(
        trained: Trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = trained.d / "a-file" / "s.png"
    failed(oocid(monkeypatch, capsys, *search(trained, "--sheet", out)), 4,
           f"{out}: could not write contact sheet: {trained.d / 'a-file'} is not a folder")


def test_a_tile_too_small_is_refused_before_any_work(
        trained: Trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failed(oocid(monkeypatch, capsys, *search(trained, "--sheet", trained.d / "s.png",
                                              "--tile", 0)), 2,
           "--tile must be >= 8 pixels, got 0")
    assert not (trained.d / "s.png").exists()


def test_a_checkpoint_folder_is_called_one_and_its_last_pt_suggested(
        trained: Trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = trained.run
    r = oocid(monkeypatch, capsys, "knn", "--checkpoint", run, "--bank", trained.bank,
              "--query", trained.d / "q.png", "--device", "cpu")
    failed(r, 2, f"{run}: is a folder, not a checkpoint file; give {run / 'last.pt'}, the "
                 "newest checkpoint of that run")
    r = oocid(monkeypatch, capsys, "export", "--checkpoint", trained.bank, "--out",
              trained.d / "b.pt")
    failed(r, 2, f"{trained.bank}: is a folder, not a checkpoint file")


def test_k_above_the_training_rows_says_so_for_a_query(
        trained: Trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = trained.d / "q.json"
    r = oocid(monkeypatch, capsys, *search(trained, "--k", 500, "--out", out))
    assert r.rc == 0, r
    lines = r.out.splitlines()
    assert lines[0] == "96 neighbours per query (k=96, all training rows; asked 500)", r
    assert len(lines) == 2 + 96
    res = json.loads(out.read_text())
    assert (res["k"], res["k_asked"]) == (96, 500)
    assert len(res["queries"][0]["neighbours"]) == 96
    r = oocid(monkeypatch, capsys, *search(trained, "--k", 5))
    assert r.out.startswith("query 1/1: ") and len(r.out.splitlines()) == 6, r


def test_each_sheet_row_is_captioned_with_its_query_files_name() -> None:
    img = Image.new("L", (16, 16))
    long = Path("some/folder/a_rather_long_query_file_name_17.png")
    hits = [QueryHits(Path("x/q.png"), img, [{"similarity": 0.5}], [img]),
            QueryHits(long, img, [], []), QueryHits(Path("ñandú_日.png"), img, [], [])]
    rows = sheet_rows(hits, 96)
    assert [c for _, c in rows[0]] == ["q.png", "0.500"]
    assert rows[2][0][1] == "nandu_?.png"  # the sheet's font draws ASCII only, not a box
    short = rows[1][0][1]
    width = ImageDraw.Draw(Image.new("L", (1, 1))).textlength(short, font=ImageFont.load_default())
    assert width <= 94 and "…" in short, short
    head, tail = short.split("…")
    assert long.name.startswith(head) and long.name.endswith(tail) and tail.endswith(".png")
    assert re.fullmatch(r"a_\w+", head), short


def test_a_neighbour_from_labeled_shards_is_captioned_with_its_class() -> None:
    """similarity, then the class, which is shortened (never the similarity) to fit the tile."""
    img = Image.new("L", (16, 16))
    near = [{"similarity": 0.93412, "class": "sneaker"},
            {"similarity": 0.5, "class": "a_very_long_class_name_indeed"},
            {"similarity": 0.25, "class": None}]
    rows = sheet_rows([QueryHits(Path("q.png"), img, near, [img] * 3)], 96)
    caps = [c for _, c in rows[0][1:]]
    assert caps[0] == "0.934 sneaker" and caps[2] == "0.250"
    width = ImageDraw.Draw(Image.new("L", (1, 1))).textlength(caps[1],
                                                              font=ImageFont.load_default())
    assert width <= 94 and caps[1].startswith("0.500 a_") and "…" in caps[1], caps
    assert caps[1].endswith("indeed"[-len(caps[1].split("…")[1]):]), caps
    tiny = sheet_rows([QueryHits(Path("q.png"), img, near[:1], [img])], 40)[0][1][1]
    assert tiny.startswith("0.934"), tiny  # the similarity stays whole on a small tile


@pytest.mark.parametrize(("args", "line"), [
    (("--temperature", "0.01"), "--temperature must be > 0.01199 with --k 200 (the weights "
                                "exp(s / t) overflow below), got 0.01"),
    (("--temperature", "nan"), "--temperature must be > 0.01199 with --k 200 (the weights "
                               "exp(s / t) overflow below), got nan"),
    (("--k", "5", "--k", "10", "--temperature", "0.0115"),
     "--temperature must be > 0.01157 with --k 10 (the weights exp(s / t) overflow below), "
     "got 0.0115"),
])
def test_a_temperature_whose_weights_overflow_is_refused_before_the_search(
        trained: Trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        args: tuple[str, ...], line: str) -> None:
    failed(oocid(monkeypatch, capsys, *classify(trained, *args)), 2, line)
