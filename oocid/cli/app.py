"""The `oocid` command: parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from oocid.atomic import atomic_write, check_writable
from oocid.cli.bank import bank_app
from oocid.cli.exits import INTERRUPTED, TRAIN_INTERRUPTED, on_interrupt
from oocid.cli.helptext import EXPORT_HELP, VERIFY_HELP
from oocid.errors import InputError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="oocid: unsupervised features by non-parametric instance discrimination (NPID), "
         "with the memory bank on disk. Start with `oocid demo`.")
app.add_typer(bank_app, name="bank")


def _print_version(value: bool) -> None:
    if value:
        from oocid.version import __version__

        print(f"oocid {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the installed version and exit.")] = False) -> None:
    pass


@app.command()
def shard(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="Image folder (class sub-folders = "
                                        "labels; flat = unlabeled) or .npz with `images` and "
                                        "optional `labels`.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder for the tar shards and "
                                        "manifest.json.")],
    shard_size: Annotated[int, typer.Option(help="Samples per shard (= bank chunk rows).")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle that assigns instance ids.")] = 0,
    split: Annotated[str, typer.Option(help="For an .npz with `<split>_images` keys.")] = "train",
    short_side: Annotated[int, typer.Option(help="Store an image whose shorter side exceeds N "
                                            "resized to N on that side (aspect kept, JPEG); "
                                            "smaller images byte for byte. 0: every image as "
                                            "given.")] = 256,
    quality: Annotated[int, typer.Option(help="JPEG quality of the resized images.")] = 90,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace the shards already in OUT.")
                     ] = False,
) -> None:
    """Write images as shuffled WebDataset tar shards plus manifest.json."""
    from oocid.data.writer import shard_summary, write_shards

    try:
        m = write_shards(src, out, shard_size=shard_size, seed=seed, split=split,
                         progress=progress, short_side=short_side, quality=quality, force=force)
    except KeyboardInterrupt as e:  # the writer says what it removed
        on_interrupt(str(e) or INTERRUPTED)
        raise
    print(shard_summary(m, out))


@app.command()
def train(
    shards: Annotated[Path, typer.Option(help="Training shard folder (from `oocid shard`).")],
    bank: Annotated[Path, typer.Option(help="Bank path: DIR.zarr (Zarr v3) or FILE.npy (memmap); "
                                       "created when missing.")],
    config: Annotated[Path | None, typer.Option(help="TOML config file, a run's config.json, "
                                                "or a bundled config by name (configs/: demo, "
                                                "imagenet_resnet18, ...). Default: a recipe "
                                                "from the data.")] = None,
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, metrics.jsonl, config.json.")
                   ] = Path("runs/oocid"),
    val: Annotated[Path | None, typer.Option(help="Labeled validation shards for a kNN check "
                                             "every train.eval_every epochs (default 1; -1, "
                                             "a recipe's: a tenth of the epochs; 0: at the "
                                             "end only) and after the last.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's last checkpoint.")
                      ] = False,
    epochs: Annotated[int | None, typer.Option(help="Override optim.epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override data.batch_size (per process "
                                                   "under torchrun).")] = None,
    lr: Annotated[float | None, typer.Option(help="Override optim.lr.")] = None,
    loss: Annotated[str | None, typer.Option(help="Override loss.kind: auto | softmax | nce | "
                                             "infonce (auto: softmax when the bank fits the "
                                             "device cache, else infonce).")
                    ] = None,
    nce_k: Annotated[int | None, typer.Option(help="Override loss.nce_k (negatives).")] = None,
    arch: Annotated[str | None, typer.Option(help="Override model.arch: small | resnet18 | "
                                             "resnet50 | cifar_resnet18.")] = None,
    device: Annotated[str | None, typer.Option(help="Override train.device: auto | cpu | cuda.")
                      ] = None,
    precision: Annotated[str | None, typer.Option(help="Override train.precision: auto | 32 | "
                                                  "16 | bf16 (autocast on CUDA; CPU runs 32).")
                         ] = None,
    negatives: Annotated[str | None, typer.Option(help="Override loss.negatives: per-sample "
                                                  "(official) | shared (one set per batch).")
                         ] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Also checkpoint every N steps "
                                                         "inside an epoch (resume mid-epoch).")
                                ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop (with a checkpoint) after N "
                                                  "optimiser steps of this call.")] = None,
    cache_mb: Annotated[float | None, typer.Option(help="Override bank.cache_mb: device cache "
                                                  "budget in MB (0: whole bank if it fits in a "
                                                  "quarter of free memory).")] = None,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard",
                                                     help="Override train.tensorboard: per-epoch "
                                                     "metrics to RUN/tb (needs `pip install "
                                                     "tensorboard`).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="<key=value>", help="Any "
                                                   "config key, e.g. --set loss.z=ema "
                                                   "(repeatable).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    verify_checksums: Annotated[bool, typer.Option("--verify-checksums", help=VERIFY_HELP)
                                ] = False,
    node_local_bank: Annotated[bool, typer.Option("--node-local-bank",
                                                  help="Under torchrun on several machines: "
                                                  "each keeps its processes' chunks in its own "
                                                  "--bank path (docs/distributed.md).")] = False,
) -> None:
    """Train NPID features; the bank lives on disk and is committed at every checkpoint.
    Several processes: launch it with torchrun (docs/distributed.md)."""
    from oocid.config import load_config

    if bank.suffix not in (".zarr", ".npy"):  # before any line about the run (recipe, loss)
        raise InputError(f"{bank}: a bank path must end with .zarr or .npy")
    on_interrupt(TRAIN_INTERRUPTED)
    overrides = list(set_ or [])
    recipe = None  # the line saying how the config was chosen, when no --config was given
    for key, value in (("optim.epochs", epochs), ("data.batch_size", batch_size),
                       ("optim.lr", lr), ("loss.nce_k", nce_k), ("bank.cache_mb", cache_mb),
                       ("train.checkpoint_every", checkpoint_every)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if tensorboard is not None:
        overrides.append(f"train.tensorboard={json.dumps(tensorboard)}")
    for key, svalue in (("loss.kind", loss), ("model.arch", arch), ("train.device", device),
                        ("train.precision", precision), ("loss.negatives", negatives)):
        if svalue is not None:
            overrides.append(f"{key}={json.dumps(svalue)}")
    if resume and config is None and (out / "config.json").is_file():
        from oocid.config import config_from_dict

        try:
            saved_dict = json.loads((out / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{out / 'config.json'}: not a readable config ({e})") from None
        saved = config_from_dict(saved_dict, str(out / "config.json"))
        cfg = load_config(None, overrides, base=saved)
    elif resume and config is None and _other_rank():  # rank 0 sends its config to the rest
        cfg = load_config(None, overrides)
    elif resume and config is None:  # killed before config.json: the defaults may be wrong
        raise InputError(f"{out / 'config.json'}: missing, so --resume cannot tell the run's "
                         "config; pass its --config, or start the run again without --resume")
    elif config is None:  # no config: a recipe that fits the data (oocid.train.recipe)
        from oocid.data.manifest import read_manifest
        from oocid.train.recipe import recipe_for, total_steps, with_overrides

        probe = load_config(None, overrides)  # bad overrides: reported before the shards are read
        from oocid.device import resolve_device
        from oocid.distributed.world import world_from_env

        m, procs = read_manifest(shards), world_from_env().size
        base, recipe = recipe_for(m, processes=procs, device=resolve_device(probe.train.device).type)
        steps = total_steps(base, m, procs)  # the recipe's, before the overrides apply to it
        cfg = load_config(None, overrides, base=base)
        now = total_steps(cfg, m, procs)
        recipe = with_overrides(recipe, overrides, None if now == steps else now)
    else:
        cfg = load_config(config, overrides)
    check_writable(out / "config.json", "the run's config", parents=True)  # before any work:
    check_writable(bank, "bank", parents=True, bank=True)  # one line, exit 4, not an internal error
    if verify_checksums:
        from oocid.data.manifest import verify_shard_dirs

        verify_shard_dirs([shards, val], progress and not _other_rank())
    from oocid.train.loop import train as run_train  # torch: imported once the config is known good
    from oocid.train.report import summary

    res = run_train(cfg, shards, bank, out, val=val, resume=resume, progress=progress,
                    max_steps=max_steps, announce=recipe, node_local_bank=node_local_bank)
    last = res.metrics[-1] if res.metrics else {}
    if not res.quiet:  # one line in words, then the JSON line scripts parse (kept last)
        print(summary(res))  # the run's step wins over the last epoch's (--max-steps after it)
        print(json.dumps({"run": str(out), **last, "epochs": res.epochs, "step": res.step}))


@app.command()
def knn(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint whose model embeds the queries.")],
    bank: Annotated[list[Path] | None, typer.Option(metavar="<path>", help="The trained bank "
                                                    "(its rows are the training features); "
                                                    "optional with "
                                                    "--recompute. Repeat it for each part of a "
                                                    "node-local bank.")] = None,
    shards: Annotated[Path | None, typer.Option(help="Labeled validation shards to classify.")
                      ] = None,
    query: Annotated[list[Path] | None, typer.Option(metavar="<path>", help="Instead of "
                                                     "--shards: an image file or a folder of "
                                                     "images; list the nearest "
                                                     "training images (repeatable).")] = None,
    train_shards: Annotated[Path | None, typer.Option(help="Training shards (labels, neighbour "
                                                      "look-up, --recompute); default: the path "
                                                      "in the checkpoint.")] = None,
    k: Annotated[list[int] | None, typer.Option(metavar="<int>", help="Neighbours; repeat for "
                                                "several k in one pass (top-k once, at the "
                                                "largest). Default: 200 with --shards, 10 with "
                                                "--query.")] = None,
    temperature: Annotated[float, typer.Option(help="sigma in exp(s / sigma).")] = 0.07,
    recompute: Annotated[bool, typer.Option(help="Score against the training shards embedded "
                                            "now with the test transform instead of the bank "
                                            "(the official CIFAR protocol).")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the result as JSON here (with "
                                             "per-class top-1 and the confusion matrix).")
                   ] = None,
    sheet: Annotated[Path | None, typer.Option(help="With --query: write a contact sheet (.png or "
                                               ".jpg/.jpeg, as the suffix says), one row per "
                                               "query (query, then neighbours with their "
                                               "similarity and class).")] = None,
    tile: Annotated[int, typer.Option(help="Contact sheet tile size in pixels.")] = 96,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    baselines: Annotated[bool, typer.Option("--baselines", help="Also score the same kNN over "
                                            "the network untrained, raw pixels and mean-centred "
                                            "pixels (a table after the result).")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars (--recompute, --baselines).")
                        ] = True,
    verify_checksums: Annotated[bool, typer.Option("--verify-checksums", help=VERIFY_HELP)
                                ] = False,
) -> None:
    """Weighted kNN top-1/top-5 of validation images against the training features, or
    (--query) the training images nearest to given images."""
    from oocid.cli import knn as knn_cli

    if (shards is None) == (not query):
        raise InputError("give either --shards DIR (classify) or --query PATH (search)")
    knn_cli.check_outputs(out, sheet, tile, search=bool(query), baselines=baselines)  # no work yet
    if query:
        if k is not None and len(k) > 1:
            raise InputError("--query takes one --k")
        meta, hits = knn_cli.run_search(bank, checkpoint, query, train_shards,
                                        k[0] if k else 10, device, recompute=recompute,
                                        progress=progress, verify=verify_checksums)
        print(knn_cli.format_hits(hits, meta))
        if sheet is not None:
            w, h = knn_cli.write_sheet(hits, sheet, tile)
            print(f"wrote {sheet} ({w}x{h})")
        if out is not None:
            atomic_write(out, knn_cli.to_json(knn_cli.search_json(meta, hits)) + "\n", "results")
        return
    assert shards is not None
    res = knn_cli.run_knn(bank, checkpoint, shards, train_shards, k or [200], temperature, device,
                          recompute=recompute, progress=progress, verify=verify_checksums,
                          baselines=baselines)
    print(knn_cli.format_result(res))
    if out is not None:
        atomic_write(out, knn_cli.to_json(res) + "\n", "results")


@app.command()
def embed(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint whose model embeds the images.")],
    shards: Annotated[Path, typer.Option(help="Any shard folder (from `oocid shard`).")],
    out: Annotated[Path, typer.Option(help="FEATS.npy (plus FEATS.index.npy and "
                                      "FEATS.labels.npy beside it) or FEATS.npz (keys "
                                      "features, index, labels, and classes: the class "
                                      "names).")],
    pre_fc: Annotated[bool, typer.Option(help="Backbone features before the fc head (not "
                                         "normalised) instead of the unit D-dim features.")
                      ] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    verify_checksums: Annotated[bool, typer.Option("--verify-checksums", help=VERIFY_HELP)
                                ] = False,
) -> None:
    """Features (N, D) float32 of a shard set in index order, with the test transform."""
    from oocid.eval.embed import embed_shards

    res = embed_shards(checkpoint, shards, out, pre_fc=pre_fc, device_name=device,
                       batch_size=batch_size, progress=progress, verify=verify_checksums)
    print(f"wrote {res.rows} x {res.dim} float32 features to {', '.join(map(str, res.paths))}"
          + (f"; skipped {res.skipped} undecodable" if res.skipped else ""))


@app.command(help=EXPORT_HELP)
def export(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint to export.")],
    out: Annotated[Path, typer.Option(help="Output state dict, e.g. backbone.pt.")],
    arch: Annotated[str | None, typer.Option(help="Expected architecture; error if the "
                                             "checkpoint's differs.")] = None,
    head: Annotated[bool, typer.Option(help="Also include the fc head (fc.weight, fc.bias).")
                    ] = False,
) -> None:
    """Export the backbone as a strict-loading state dict (see EXPORT_HELP in oocid/cli/helptext.py)."""
    from oocid.eval.export import export_checkpoint, load_recipe

    info = export_checkpoint(checkpoint, out, arch=arch, head=head)
    keys = "with the fc head" if head else "backbone without fc"
    print(f"wrote {out}: {info.arch}, {info.n_tensors} tensors, {info.n_params} values ({keys}; "
          f"outputs {info.feature_dim}-d)\nload: {load_recipe(info)}")


@app.command()
def linear(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint whose frozen backbone is probed.")],
    train_shards: Annotated[Path, typer.Option(help="Labeled shards to fit the classifier on.")],
    val_shards: Annotated[Path, typer.Option(help="Labeled shards to report top-1/top-5 on.")],
    epochs: Annotated[int | None, typer.Option(help="Passes over the training features "
                                               "(default: 20, more on a small set so the probe "
                                               "makes 2,000 steps).")] = None,
    lr: Annotated[float, typer.Option(help="Adam learning rate (cosine schedule to 0).")] = 0.01,
    batch_size: Annotated[int, typer.Option(help="Classifier batch size.")] = 256,
    head: Annotated[bool, typer.Option(help="Probe the 128-d embedding instead of the pre-fc "
                                       "backbone features.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the result as JSON here.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    verify_checksums: Annotated[bool, typer.Option("--verify-checksums", help=VERIFY_HELP)
                                ] = False,
) -> None:
    """Linear probe: logistic regression (one nn.Linear) on frozen, L2-normalised pre-fc
    backbone features (test transform, no augmentation); checks the backbone is unchanged."""
    from oocid.eval.linear import ProbeConfig, format_linear, linear_eval

    res = linear_eval(checkpoint, train_shards, val_shards, head=head, device_name=device,
                      probe=ProbeConfig(epochs, lr, batch_size), progress=progress,
                      verify=verify_checksums)
    print(format_linear(res))
    if out is not None:
        atomic_write(out, json.dumps(res, indent=2) + "\n", "results")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for shards, bank, run and demo.json "
                                      "(rebuilt if it is a previous demo folder).")] = Path("oocid-demo"),
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default from the demo "
                                               "config, 90: about 3 min on 2 cores).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Shard the bundled Fashion-MNIST subset, train, and compare kNN accuracy with baselines."""
    from oocid.demo import format_demo, run_demo

    res = run_demo(out, epochs=epochs, progress=progress)
    print(format_demo(res))
    print(f"wrote {out / 'demo.json'}")


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A run folder (holds metrics.jsonl).")],
    out: Annotated[Path | None, typer.Option(help="PNG path (default RUN/metrics.png).")
                   ] = None,
) -> None:
    """Draw loss and kNN accuracy over epochs as a PNG."""
    from oocid.eval.plot import plot_run

    print(f"wrote {plot_run(run_dir, out)}")


def _other_rank() -> bool:
    """Whether this is a torchrun process other than rank 0 (which sends the run's config)."""
    from oocid.distributed.world import world_from_env

    return not world_from_env().main
