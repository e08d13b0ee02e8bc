"""`oocid bank info | verify | init`: inspect, verify or create an on-disk bank."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from oocid.errors import InputError, VerifyError

bank_app = typer.Typer(no_args_is_help=True, help="Inspect, verify or create an on-disk bank.")


@bank_app.command("info")
def bank_info(path: Annotated[Path, typer.Argument(help="bank.zarr or bank.npy")]) -> None:
    """N, D, dtype, store, size on disk, last committed step, norm statistics."""
    from oocid.bank.verify import store_info

    info = store_info(path)
    for key, value in info.items():
        print(f"{key:>16}: {value}")


@bank_app.command("verify")
def bank_verify(
    path: Annotated[Path, typer.Argument(help="bank.zarr or bank.npy")],
    tol: Annotated[float | None, typer.Option(help="Allowed | ||v|| - 1 |.")] = None,
) -> None:
    """Check every row is finite and unit-norm and the metadata is consistent (exit 1 if not)."""
    from oocid.bank.verify import verify_store

    rep = verify_store(path, tol=tol)
    if not rep.ok:
        rows = ", ".join(str(r) for r in rep.bad_rows)
        detail = "; ".join(rep.problems)  # each names the file
        raise VerifyError(f"{path}: {rep.n_bad} bad rows (first: {rows}); {detail}" if rep.n_bad
                          else detail)
    print(f"{path}: ok ({rep.n_rows} rows x {rep.dim}, {rep.dtype}, max | |v|-1 | = "
          f"{rep.max_norm_error:.2e})")
    for note in rep.notes:
        print(f"note: {note}")


@bank_app.command("init")
def bank_init(
    path: Annotated[Path, typer.Argument(help="New bank.zarr or bank.npy")],
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
    check_writable(path, "bank")  # one line, exit 4 (ENOTDIR below a file, read-only, ...)
    st = create_store(path, rows, dim, dtype=dtype, chunk_rows=chunk_rows or 4096,
                      manifest_id=manifest_id, seed=seed, progress=progress)
    st.close()
    print(f"created {path}: {rows} x {dim} {dtype}")
