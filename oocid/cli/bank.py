"""`oocid bank info | verify | assemble | init`: inspect, verify, join or create a bank."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from oocid.errors import DataError, InputError, OocidError, VerifyError

bank_app = typer.Typer(no_args_is_help=True, help="Inspect, verify or create an on-disk bank.")


@bank_app.command("info")
def bank_info(path: Annotated[Path, typer.Argument(metavar="BANK", help="bank.zarr or bank.npy")]
              ) -> None:
    """N, D, dtype, store, size on disk, last committed step, norm statistics (exit 3 after the
    rest when a chunk file is damaged: the norms are not computed then)."""
    from oocid.bank.verify import store_info

    info = store_info(path)
    damaged = info.pop("damaged", None)
    for key, value in info.items():
        print(f"{key:>16}: {value}")
    if damaged is not None:
        print(f"{'norms':>16}: not computed (a damaged chunk file, below)")
        raise DataError(f"{damaged}; the norm statistics were not computed (`oocid bank verify "
                        f"{path}` names every damaged chunk file)")


@bank_app.command("verify")
def bank_verify(
    paths: Annotated[list[Path], typer.Argument(metavar="BANK", help="bank.zarr or bank.npy "
                                                "(several: each "
                                                "whole bank on its own); or every part of a "
                                                "bank trained with --node-local-bank")],
    tol: Annotated[float | None, typer.Option(help="Allowed | ||v|| - 1 |. Default: 1e-4 for a "
                                              "float32 bank, 1e-3 for float16.")] = None,
) -> None:
    """Check every row is finite and unit-norm and the metadata is consistent (exit 1 if not);
    for the parts of a node-local bank, also that together they hold every chunk once, of the
    same shards, at the same committed step. Several banks (a shell's *.zarr): each whole bank
    is checked on its own and the parts together, a line for each; exit 1 if any fails."""
    failed = _verify_all(paths, tol)
    if failed:  # with one bank, its problem; with several, each was said on its own line
        raise VerifyError(failed[0] if len(paths) == 1 else
                          f"{len(failed)} of the checks of {len(paths)} banks failed (each "
                          "named above)")


@bank_app.command("assemble")
def bank_assemble(
    parts: Annotated[list[Path], typer.Argument(metavar="PART", help="Every part of a bank trained with "
                                                "--node-local-bank (copied to one machine).")],
    out: Annotated[Path, typer.Option(help="The whole bank to write (.zarr or .npy).")],
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Join the node-local parts of a bank into one ordinary bank (for `oocid knn`, `embed`,
    or to resume the run with another number of processes)."""
    from oocid.atomic import check_writable
    from oocid.bank.parts import assemble

    check_writable(out, "bank", parents=True, bank=True)
    step = assemble(parts, out, progress)
    print(f"{out}: assembled from {len(parts)} parts at step {step}")


@bank_app.command("init")
def bank_init(
    path: Annotated[Path, typer.Argument(metavar="BANK", help="New bank.zarr or bank.npy")],
    rows: Annotated[int | None, typer.Option(help="N rows (or take it from --shards).")] = None,
    dim: Annotated[int, typer.Option(help="D.")] = 128,
    dtype: Annotated[str, typer.Option(help="float32 | float16 on disk.")] = "float32",
    chunk_rows: Annotated[int | None, typer.Option(help="Rows per chunk (default: the shard "
                                                   "size, else 4096).")] = None,
    shards: Annotated[Path | None, typer.Option(help="Shard folder: N, chunking and identity.")
                      ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random unit rows.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Create a bank of random unit rows."""
    from oocid.atomic import check_writable
    from oocid.bank.create import create_store

    manifest_id = None
    if shards is not None:
        from oocid.data.manifest import read_manifest

        m = read_manifest(shards)
        if rows is not None and rows != m.n:
            raise InputError(f"--rows {rows} disagrees with {shards} ({m.n} samples)")
        rows, manifest_id = m.n, m.identity
        chunk_rows = chunk_rows or m.shard_size
    if rows is None:
        raise InputError("give --rows N or --shards DIR")
    check_writable(path, "bank", bank=True)  # one line, exit 4 (ENOTDIR below a file, read-only, ...)
    st = create_store(path, rows, dim, dtype=dtype, chunk_rows=chunk_rows or 4096,
                      manifest_id=manifest_id, seed=seed, progress=progress)
    st.close()
    print(f"created {path}: {rows} x {dim} {dtype}")


def _verify_all(paths: list[Path], tol: float | None) -> list[str]:
    """Verify each bank, then the node-local parts among them together (when every part
    verified); print a line for each that passes and, with several banks, an error line for
    each that fails. Returns the failures' lines."""
    from oocid.bank.parts import chunks_of, read_part
    from oocid.bank.verify import verify_store

    failed: list[str] = []

    def fail(line: str) -> None:
        failed.append(line)
        if len(paths) > 1:  # one bank: its line is the command's error
            print(f"oocid: error: {line}", file=sys.stderr)

    parts: list[tuple[Path, dict[str, Any]]] = []
    for path in paths:
        try:
            rep = verify_store(path, tol=tol)
        except OocidError as e:  # no bank there: a missing path, a file a shell glob matched
            if len(paths) == 1:
                raise
            fail(str(e))
            continue
        if not rep.ok:
            rows = ", ".join(str(r) for r in rep.bad_rows)
            detail = "; ".join(rep.problems)  # each names the file
            fail(f"{path}: {rep.n_bad} bad rows (first: {rows}); {detail}" if rep.n_bad
                 else detail)
            continue
        print(f"{path}: ok ({rep.n_rows} rows x {rep.dim}, {rep.dtype}, max | |v|-1 | = "
              f"{rep.max_norm_error:.2e})")
        for note in rep.notes:
            print(f"note: {note}")
        try:
            part = read_part(path)
        except OocidError as e:
            fail(str(e))
            continue
        if part is not None:
            parts.append((path, part))
    n_parts = sum(1 for p in paths if _is_part(p))
    if len(parts) > 1 and len(parts) == n_parts:
        try:
            chunks_of([p for p, _ in parts])
        except OocidError as e:
            fail(str(e))
        else:
            print(f"{len(parts)} parts: every chunk once, same shards, same committed step")
    elif len(parts) == 1 and n_parts == 1:
        path, part = parts[0]
        print(f"note: {path} is one part of a node-local bank ({len(part['chunks'])} chunks); "
              "give every part to check that together they hold each chunk once")
    return failed


def _is_part(path: Path) -> bool:
    from oocid.bank.parts import part_path

    return part_path(path).is_file()
