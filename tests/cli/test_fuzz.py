"""Fuzzing the readers: generated manifests, configs and tar shards give a result or an
OocidError (a one-line message for the user), never another exception (a traceback).

Readers covered: `manifest.read_manifest` (+ the stream's use of the manifest's image statistics),
`config.load_config` / `parse_override` / `config_from_dict`, `reader.iter_samples` and the
training stream's decode of a shard (`stream.StreamData`, `memory.decode_all`).
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oocid.config import Config, config_from_dict, load_config, parse_override
from oocid.data.batch import fits_in_memory, image_channels, same_size
from oocid.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from oocid.data.memory import decode_all
from oocid.data.reader import iter_samples
from oocid.data.stream import StreamData
from oocid.data.writer import write_shards
from oocid.errors import DataError, OocidError

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
           | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def must_not_leak(fn: Any, *args: Any) -> Any:
    """fn(*args), or None when it raised an OocidError; any other exception fails the test."""
    try:
        return fn(*args)
    except OocidError as e:
        assert "\n" not in str(e), str(e)
        return None


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    np.savez(root / "d.npz", images=rng.integers(0, 256, (7, 6, 5), dtype=np.uint8),
             labels=np.arange(7) % 2)
    return write_shards(root / "d.npz", root / "s", shard_size=3, progress=False)


# ---- manifests --------------------------------------------------------------------------------


def set_at(obj: Any, path: list[Any], value: Any, delete: bool) -> Any:
    """A copy of JSON `obj` with the item at `path` (keys / indices, as far as they exist)
    replaced by `value`, or deleted."""
    if not path or not isinstance(obj, (dict, list)) or not obj:
        return value
    out: Any = dict(obj) if isinstance(obj, dict) else list(obj)
    key = path[0]
    key = sorted(out)[key % len(out)] if isinstance(out, dict) else key % len(out)
    if delete and len(path) == 1:
        del out[key]
        return out
    out[key] = set_at(out[key], path[1:], value, delete)
    return out


def use_manifest(m: Manifest) -> None:
    """What the trainer reads from a manifest beyond read_manifest itself."""
    channels = image_channels(m)
    same_size(m)
    fits_in_memory(m, channels, 64)


@SETTINGS
@given(path=st.lists(st.integers(0, 50), min_size=1, max_size=4), value=JSON,
       delete=st.booleans())
def test_mutated_manifest(shard_dir: Manifest, path: list[int], value: Any, delete: bool) -> None:
    """A valid manifest with one nested item replaced (or deleted) by arbitrary JSON."""
    file = shard_dir.root / MANIFEST_NAME
    good = file.read_text()
    try:
        file.write_text(json.dumps(set_at(json.loads(good), path, value, delete)))
        m = must_not_leak(read_manifest, shard_dir.root)
        if m is not None:
            must_not_leak(use_manifest, m)
    finally:
        file.write_text(good)


@SETTINGS
@given(raw=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode())
       | st.integers(1, 100_000).map(lambda d: b"[" * d + b"]" * d))
def test_arbitrary_manifest_bytes(shard_dir: Manifest, raw: bytes) -> None:
    file = shard_dir.root / MANIFEST_NAME
    good = file.read_text()
    try:
        file.write_bytes(raw)
        assert must_not_leak(read_manifest, shard_dir.root) is None
    finally:
        file.write_text(good)


# ---- configs ----------------------------------------------------------------------------------

VALID = Config().to_dict()
KNOWN_KEYS = [(sec, key) for sec, keys in VALID.items() for key in keys]
TOML_SCALARS = (st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=10))
TOML_VALUES = st.recursive(TOML_SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")) if not math.isfinite(v) \
            else repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)  # int or str (JSON string escapes are TOML basic-string escapes)


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    return "".join(f"[{json.dumps(sec)}]\n" + "".join(f"{json.dumps(k)} = {toml_value(v)}\n"
                                                       for k, v in keys.items())
                   for sec, keys in sections.items())


@SETTINGS
@given(changes=st.lists(st.tuples(st.sampled_from(KNOWN_KEYS) | st.tuples(
    st.text(max_size=6), st.text(max_size=6)), TOML_VALUES), max_size=4))
def test_mutated_config(tmp_path: Path, changes: list[tuple[tuple[str, str], Any]]) -> None:
    """The valid default config with some keys (known or not) set to values of any type."""
    sections: dict[str, dict[str, Any]] = {sec: dict(keys) for sec, keys in VALID.items()}
    for (sec, key), value in changes:
        sections.setdefault(sec, {})[key] = value
    path = tmp_path / "c.toml"
    path.write_text(toml_text(sections))
    cfg = must_not_leak(load_config, path)
    if cfg is not None:  # what loaded is in range: numbers finite, choices known
        for sec in cfg.to_dict().values():
            for v in sec.values():
                assert not isinstance(v, float) or math.isfinite(v), cfg
    must_not_leak(config_from_dict, sections)


def test_numbers_out_of_range(tmp_path: Path) -> None:
    """NaN, inf, 2**64 and an integer of more digits than Python converts (ValueError)."""
    path = tmp_path / "c.toml"
    for text, problem in (("lr = nan", "optim.lr must be a finite number, got nan"),
                          ("lr = -inf", "optim.lr must be a finite number, got -inf"),
                          (f"lr = {10**400}", "optim.lr must be a finite number, got a huge"),
                          (f"epochs = {2**64}", "optim.epochs is out of range"),
                          ("lr = " + "1" * 5000, "not valid TOML")):
        path.write_text(f"[optim]\n{text}\n")
        with pytest.raises(OocidError, match=re.escape(f"{path}: {problem}")):
            load_config(path)
    with pytest.raises(OocidError, match="optim.lr must be a number"):
        load_config(None, ["optim.lr=" + "1" * 5000])


@SETTINGS
@given(text=st.text(max_size=200) | st.binary(max_size=100).map(
    lambda b: b.decode("latin-1")))
def test_arbitrary_config_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    must_not_leak(load_config, path)


@SETTINGS
@given(item=st.text(max_size=40) | st.tuples(st.sampled_from(KNOWN_KEYS), st.text(max_size=12))
       .map(lambda t: f"{t[0][0]}.{t[0][1]}={t[1]}"))
def test_arbitrary_override(item: str) -> None:
    must_not_leak(load_config, None, [item])
    must_not_leak(parse_override, item)


# ---- tar shards -------------------------------------------------------------------------------


def png(rng: np.random.Generator) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name[:99] or "x")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


KEYS = st.sampled_from(["000000000", "000000001", "000000002", "x", "a/b", "../up", ""])
EXTS = st.sampled_from(["png", "jpg", "json", "cls", "PNG", "txt", "", "png.json"])


@st.composite
def member_data(draw: st.DrawFn, ext: str) -> bytes:
    if ext == "json" and draw(st.booleans()):
        meta = {"index": draw(st.integers(-5, 10) | st.booleans() | st.none() | st.text(max_size=3)
                              | st.floats()),
                "label": draw(st.none() | st.integers(-2, 3) | st.text(max_size=2)),
                "path": draw(st.text(max_size=4) | st.integers())}
        meta = {k: v for k, v in meta.items() if draw(st.booleans()) or k == "index"}
        return json.dumps(meta).encode()
    if ext == "json":
        return draw(JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=30)
                    | st.integers(1, 5000).map(lambda d: b"[" * d + b"]" * d))
    if ext.lower() in ("png", "jpg") and draw(st.booleans()):
        return png(np.random.default_rng(draw(st.integers(0, 9))))
    return draw(st.binary(max_size=60))


@st.composite
def shard_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["members", "truncated", "garbage"]))
    if kind == "garbage":
        return draw(st.binary(max_size=2000))
    members = []
    for _ in range(draw(st.integers(0, 7))):
        key, ext = draw(KEYS), draw(EXTS)
        members.append((f"{key}.{ext}" if ext else key, draw(member_data(ext))))
    data = tar_bytes(members)
    if kind == "truncated":
        data = data[:draw(st.integers(0, len(data)))]
    return data


def stream_once(m: Manifest) -> None:
    """One epoch of the training stream (workers 0) and the in-memory decode."""
    from oocid.data.augment import sample_transform

    tf = sample_transform("gray", 6, [0.5], [0.25], 0.5, train=True)
    data = StreamData(m, 1, 4, tf, 0, torch.device("cpu"), workers=0, shuffle_buffer=4, size=6)
    for b in data.epoch_batches(0):  # an index outside the manifest's range would hit the bank
        assert ((b.index >= 0) & (b.index < m.n)).all(), b.index
    _, _, valid = decode_all(m, 1)
    assert valid.shape == (m.n,)


@SETTINGS
@given(data=shard_bytes())
def test_arbitrary_tar_shard(tmp_path: Path, shard_dir: Manifest, data: bytes) -> None:
    """A shard of arbitrary members, truncated, or not a tar at all: iter_samples and the
    training stream's decode of it either work or raise an OocidError naming the shard."""
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(data)
    samples = must_not_leak(lambda: list(iter_samples(shard)))
    if samples is None:
        return
    info = replace(shard_dir.shards[0], nbytes=len(data))
    m = replace(shard_dir, root=tmp_path, n=3, shards=(info,),
                image_stats={**shard_dir.image_stats, "height": {"min": 6, "max": 6, "mean": 6.0},
                             "width": {"min": 5, "max": 5, "mean": 5.0}})
    must_not_leak(stream_once, m)


def one_sample_tar(meta: bytes, key: str = "000000000") -> bytes:
    return tar_bytes([(f"{key}.png", png(np.random.default_rng(0))), (f"{key}.json", meta)])


@pytest.mark.parametrize(("meta", "problem"), [
    (b"[" * 100_000 + b"]" * 100_000, "bad json member: nested too deeply"),
    (b'{"index": 7, "label": 0, "path": "x"}', "has index 7 where the manifest's range"),
    (b'{"index": -1, "label": 0, "path": "x"}', "has index -1 where"),
    (b'{"index": true, "label": 0, "path": "x"}', "bad json member types"),
    (b'{"index": 0, "label": 0}', "bad json member: KeyError"),
])
def test_bad_json_members_name_the_shard_and_sample(tmp_path: Path, meta: bytes,
                                                    problem: str) -> None:
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(one_sample_tar(meta))
    with pytest.raises(OocidError, match=re.escape("shard-000000.tar: sample 000000000")
                       + ".* " + re.escape(problem)):
        list(iter_samples(shard, (0, 3)))


def test_a_shard_with_fewer_samples_than_the_manifest_lists(tmp_path: Path) -> None:
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(one_sample_tar(b'{"index": 3, "label": null, "path": "x"}'))
    assert [s.index for s in iter_samples(shard, (3, 4))] == [3]
    with pytest.raises(OocidError, match=r"shard-000000\.tar: holds 1 samples, the manifest "
                                         r"lists 2"):
        list(iter_samples(shard, (3, 5)))


def _reseal(data: bytearray, at: int) -> None:
    """Recompute the checksum of the tar header at byte `at` (as tarfile writes it)."""
    hdr = data[at:at + 512]
    hdr[148:156] = b" " * 8
    data[at + 148:at + 156] = b"%06o\0 " % sum(hdr)


@st.composite
def any_tar(draw: st.DrawFn) -> bytes:
    """Valid samples (json + image, indices 0, 1, ...) in ustar, GNU or pax format, with odd
    members mixed in (pax / GNU long or non-ASCII names, links, directories, names ending in
    "/", random keys), then maybe a header field overwritten and its checksum recomputed, maybe
    a bit flipped, maybe truncated."""
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        index = 0
        for _ in range(draw(st.integers(0, 6))):
            odd = draw(st.sampled_from(["none"] * 4 + ["key", "long", "utf8", "dir", "slash", "link"]))
            members: list[tuple[str, bytes, bytes]] = []
            if odd == "key":
                key, ext = draw(KEYS), draw(EXTS)
                name = f"{key}.{ext}" if ext else key or "x"
                members.append((name, draw(member_data(ext)), tarfile.REGTYPE))
            elif odd in ("dir", "slash", "link"):
                slash = draw(st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE]))
                kind = {"dir": tarfile.DIRTYPE, "slash": slash, "link": tarfile.SYMTYPE}[odd]
                members.append(("d/" if odd == "slash" else "d", b"" if odd != "slash" else
                                draw(st.binary(max_size=3)), kind))
            else:
                key = f"{index:09d}"
                if odd == "long":
                    key = "L" * draw(st.integers(90, 160)) + "/" + key
                elif odd == "utf8":
                    key = "\u00e9t\u00e9/" + key
                meta = json.dumps({"index": index, "label": index % 3, "path": f"p{index}"}).encode()
                members += [(f"{key}.png", png(np.random.default_rng(index)), tarfile.REGTYPE),
                            (f"{key}.json", meta, tarfile.REGTYPE)]
                index += 1
            for name, data, kind in members:
                info = tarfile.TarInfo(name)
                info.type = kind
                info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
                if kind == tarfile.SYMTYPE:
                    info.linkname = "elsewhere"
                try:
                    tar.addfile(info, io.BytesIO(data) if info.size else None)
                except ValueError:  # a name this format cannot hold
                    pass
    data = bytearray(buf.getvalue())
    headers = [m.offset for m in tarfile.open(fileobj=io.BytesIO(bytes(data))).getmembers()]
    if headers and draw(st.booleans()):  # a header that passes the checksum, with a bad field
        at = draw(st.sampled_from(headers))
        a, b = draw(st.sampled_from([(0, 100), (100, 108), (124, 136), (136, 148), (156, 157),
                                     (329, 337), (345, 500)]))
        field = draw(st.sampled_from([b"-1", b"777777777777", b"x", b"\x80\x00\x00\x01", b"0",
                                      b"5", b"a/", b"\xff"]))
        data[at + a:at + b] = field[:b - a].ljust(b - a, b"\0")
        _reseal(data, at)
    if data and draw(st.booleans()):
        data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@SETTINGS
@given(data=any_tar())
def test_fast_tar_reader_reads_what_tarfile_reads(tmp_path: Path, data: bytes) -> None:
    """oocid's own ustar reader (with its fallback to tarfile for pax / GNU headers and links)
    yields exactly the samples tarfile does, and stops with a DataError naming the shard where
    tarfile does (having yielded the same samples, give or take the last complete one); where
    tarfile finds no file member it does not look for the end-of-archive marker, so a truncated
    shard of directories only is an error for oocid's reader alone."""
    from oocid.data.reader import _iter_raw, _iter_tarfile

    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(data)

    def read(fn: Any) -> tuple[list[Any], bool]:
        got: list[Any] = []
        try:
            for s in fn(shard):
                got.append(s)
        except DataError as e:
            assert str(shard) in str(e)
            return got, True
        return got, False

    (ours, ours_err), (theirs, theirs_err) = read(_iter_raw), read(_iter_tarfile)
    if ours_err and theirs_err:  # a damaged shard stops a run: the samples read before it
        # agree, but for the one whose key was complete when the bad member came (tarfile
        # yields it first when the damage is in the member's data, not in its header)
        short, long = sorted((ours, theirs), key=len)
        assert long[:len(short)] == short and len(long) - len(short) <= 1, (ours, theirs)
    else:
        assert ours == theirs
        assert ours_err == theirs_err or (ours_err and not theirs)
