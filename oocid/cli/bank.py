"""`oocid bank info | verify | assemble | init`: inspect, verify, join or create a bank."""

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
    paths: Annotated[list[Path], typer.Argument(help="bank.zarr or bank.npy; or every part of "
                                                "a bank trained with --node-local-bank")],
    tol: Annotated[float | None, typer.Option(help="Allowed | ||v|| - 1 |.")] = None,
) -> None:
    """Check every row is finite and unit-norm and the metadata is consistent (exit 1 if not);
    for the parts of a node-local bank, also that together they hold every chunk once, of the
    same shards, at the same committed step."""
    from oocid.bank.parts import chunks_of, read_part
    from oocid.bank.verify import verify_store

    for path in paths:
        rep = verify_store(path, tol=tol)
        if not rep.ok:
            rows = ", ".join(str(r) for r in rep.bad_rows)
            detail = "; ".join(rep.problems)  # each names the file
            raise VerifyError(f"{path}: {rep.n_bad} bad rows (first: {rows}); {detail}"
                              if rep.n_bad else detail)
        print(f"{path}: ok ({rep.n_rows} rows x {rep.dim}, {rep.dtype}, max | |v|-1 | = "
              f"{rep.max_norm_error:.2e})")
        for note in rep.notes:
            print(f"note: {note}")
    if len(paths) > 1:
        print(f"{len(chunks_of(paths))} parts: every chunk once, same shards, same committed step")
    elif (part := read_part(paths[0])) is not None:
        print(f"note: {paths[0]} is one part of a node-local bank ({len(part['chunks'])} chunks); "
              "give every part to check that together they hold each chunk once")


@bank_app.command("assemble")
def bank_assemble(
    parts: Annotated[list[Path], typer.Argument(help="Every part of a bank trained with "
                                                "--node-local-bank (copied to one machine).")],
    out: Annotated[Path, typer.Option(help="The whole bank to write (.zarr or .npy).")],
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Join the node-local parts of a bank into one ordinary bank (for `oocid knn`, `embed`,
    or to resume the run with another number of processes)."""
    from oocid.atomic import check_writable
    from oocid.bank.parts import assemble

    check_writable(out, "bank", parents=True)
    step = assemble(parts, out, progress)
    print(f"{out}: assembled from {len(parts)} parts at step {step}")


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
