"""Typed run configuration: dataclasses, loaded from TOML with strict checking.

A config file has the sections [model], [data], [loss], [optim], [bank], [train]; every key is
optional and defaults to the paper's ImageNet settings (docs/method.md, "Defaults"). Unknown keys and
wrong types are errors naming the file and the key. Overrides from the command line use the
same dotted names (`optim.lr=0.1`). The resolved config is saved beside a run's outputs and in
every checkpoint, so a run can be rebuilt from either.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from oocid.errors import InputError

Arch = Literal["small", "resnet18", "resnet50", "cifar_resnet18"]
AugmentKind = Literal["imagenet", "cifar", "gray"]
InMemory = Literal["auto", "yes", "no"]
StreamAugment = Literal["auto", "batch", "sample"]
LossKind = Literal["auto", "nce", "softmax", "infonce"]
ZMode = Literal["oneshot", "ema"]
Negatives = Literal["per-sample", "shared"]
NegativesFrom = Literal["whole", "own"]
Schedule = Literal["step", "cosine"]
BankDtype = Literal["float32", "float16"]
Precision = Literal["auto", "32", "16", "bf16"]


@dataclass
class ModelConfig:
    arch: Arch = "resnet18"  # small | resnet18 | resnet50 | cifar_resnet18
    dim: int = 128  # feature / bank dimension D
    channels_last: bool = True
    # several processes (torchrun): BatchNorm statistics over the global batch
    # (oocid.distributed.batchnorm); the default keeps each process's own
    sync_batchnorm: bool = False


AUTO_WORKERS = -1  # data.workers: as many DataLoader workers as the CPUs allow (data_workers)


def data_workers(workers: int) -> int:
    """The DataLoader worker count of `data.workers`: itself, or for -1 (the default) one CPU
    left to the training process and at most 4 (more rarely pays at the usual batch sizes)."""
    if workers != AUTO_WORKERS:
        return workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


@dataclass
class DataConfig:
    image_size: int = 224  # training crop size (small images: their own size)
    augment: AugmentKind = "imagenet"  # imagenet | cifar | gray
    crop_scale_min: float = 0.2  # RandomResizedCrop area scale lower bound
    flip: bool = True  # random horizontal flip (off for text, digits, oriented scenes)
    in_memory: InMemory = "auto"  # auto | yes | no: decode the whole set into memory once
    in_memory_max_mb: int = 2048
    # streamed sets: "batch" augments whole batches in the workers (BatchAugment, as in memory),
    # "sample" per image (the torchvision recipes); auto: batch for same-size images <= 64 px
    stream_augment: StreamAugment = "auto"
    batch_size: int = 256
    workers: int = AUTO_WORKERS  # DataLoader workers; -1 (auto): min(4, CPUs - 1), see data_workers
    shuffle_buffer: int = 2048
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class LossConfig:
    kind: LossKind = "auto"  # auto (measured default per regime, auto_loss) | softmax | nce | infonce
    nce_k: int = 4096  # negatives per sample (K, the paper's m)
    temperature: float = 0.07
    z: ZMode = "oneshot"  # oneshot (official) | ema (moving average)
    z_momentum: float = 0.99
    negatives: Negatives = "per-sample"  # per-sample (official) | shared (one set per batch)
    # several processes: draw from each process's own rows (own), or from rows of the whole
    # bank exchanged each step (whole: an all-gather of min(4 K, N) rows a step; measured no
    # better on the demo set); docs/distributed.md, "Negatives"
    negatives_from: NegativesFrom = "own"
    eps: float = 1e-7


@dataclass
class OptimConfig:
    epochs: int = 200
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Schedule = "step"  # step | cosine (per iteration, to 0)
    accumulate: int = 1  # micro-batches per optimiser step (gradient accumulation)
    milestones: list[int] = field(default_factory=lambda: [120, 160])
    gamma: float = 0.1


@dataclass
class BankConfig:
    momentum: float = 0.5  # weight on the OLD row
    dtype: BankDtype = "float32"  # float32 | float16 (on disk)
    seed: int = 0
    cache_mb: float = 0.0  # device cache budget; 0: the whole bank if it fits in 1/4 of free memory
    # cache chunks held for the batch's positives; 0: sized for the data order (streamed:
    # max(S/4, max(1, workers) x (ceil(shuffle_buffer / R) + 5)); in memory: 2 x ceil(batch / R)
    # + 1), then shrunk, down to one batch's chunks (streamed: one worker's share), until the
    # window of negatives holds min(4 K, max(K, N/2)) rows (oocid.bank.sizing, train.make_cache)
    pool_chunks: int = 0


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    knn_k: int = 200
    knn_temperature: float = 0.07
    eval_every: int = 1  # epochs between kNN checks on --val (0: at the end; -1: a tenth of the run)
    threads: int = 0  # torch CPU threads (0: torch's default)
    precision: Precision = "auto"  # auto (bf16 on CUDA where supported, else 16; 32 on CPU) | 32 | 16 | bf16
    compile: bool = False  # torch.compile the model
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0: epochs only)
    tensorboard: bool = False  # per-epoch metrics as TensorBoard scalars in RUN/tb (needs tensorboard)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _choices() -> dict[str, tuple[str, ...]]:
    """{"loss.kind": ("auto", "nce", ...), ...}: every key typed as a Literal, with its values."""
    out = {}
    for sec_name, sec_type in typing.get_type_hints(Config).items():
        for name, ftype in typing.get_type_hints(sec_type).items():
            if typing.get_origin(ftype) is Literal:
                out[f"{sec_name}.{name}"] = typing.get_args(ftype)
    return out


CHOICES = _choices()
POSITIVE = ("model.dim", "data.image_size", "data.batch_size", "optim.epochs", "loss.nce_k",
            "train.knn_k", "data.shuffle_buffer", "optim.accumulate")


def _check_value(where: str, name: str, ftype: Any, value: Any) -> Any:
    origin = typing.get_origin(ftype)
    if origin is list:
        (inner,) = typing.get_args(ftype)
        if not isinstance(value, list):
            raise InputError(f"{where}: {name} must be a list, got {value!r}")
        return [_check_value(where, f"{name}[{i}]", inner, v) for i, v in enumerate(value)]
    if ftype is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if ftype is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: {name} must be an integer, got {value!r}")
        if not -2**63 <= value < 2**63:
            raise InputError(f"{where}: {name} is out of range (a 64-bit integer)")
        return value
    if ftype is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: {name} must be a number, got {value!r}")
        if not (-1e300 < value < 1e300):  # also NaN; and no OverflowError from a huge int
            shown = f"{value!r}" if isinstance(value, float) else "a huge integer"
            raise InputError(f"{where}: {name} must be a finite number, got {shown}")
        return float(value)
    if ftype is str or typing.get_origin(ftype) is Literal:  # a Literal's choice: `validate`
        if not isinstance(value, str):
            raise InputError(f"{where}: {name} must be a string, got {value!r}")
        return value
    raise InputError(f"{where}: {name} has an unsupported type")  # pragma: no cover


def _section_types(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def apply_mapping(cfg: Config, data: dict[str, Any], where: str) -> Config:
    """Apply a nested mapping {section: {key: value}} onto cfg, strictly."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: the config must be a table of sections")
    sections = {f.name for f in dataclasses.fields(cfg)}
    for sec_name, sec_values in data.items():
        if sec_name not in sections:
            raise InputError(f"{where}: unknown config section [{sec_name}] "
                             f"(known: {', '.join(sorted(sections))})")
        if not isinstance(sec_values, dict):
            raise InputError(f"{where}: [{sec_name}] must be a table")
        section = getattr(cfg, sec_name)
        types = _section_types(section)
        for key, value in sec_values.items():
            if key not in types:
                raise InputError(f"{where}: unknown config key {sec_name}.{key} "
                                 f"(known: {', '.join(sorted(types))})")
            setattr(section, key, _check_value(where, f"{sec_name}.{key}", types[key], value))
    validate(cfg, where)
    return cfg


FLOAT32_LOG_MAX = 88.72283905206835  # log of the largest float32


def temperature_floor(terms: int) -> float:
    """The temperature t at which `terms` values exp(s / t), s <= 1 (cosine), sum to the
    largest float32; the sum is finite for every t above it. kNN: the weights of the k
    nearest rows (0.0120 at k 200); NCE: the B (K + 1) values whose mean estimates Z (Z itself,
    that mean times N, can still overflow on collapsed features in a narrow band above the
    floor: at N 1.28 M, t 0.01336-0.01339; the run's non-finite check catches it)."""
    return 1.0 / (FLOAT32_LOG_MAX - math.log(max(1, terms)))


def validate(cfg: Config, where: str = "config") -> None:
    """Choices of the Literal-typed keys, and range checks that types alone cannot express."""
    for name, choices in CHOICES.items():
        sec, key = name.split(".")
        value = getattr(getattr(cfg, sec), key)
        if value not in choices:
            raise InputError(f"{where}: {name} must be one of {', '.join(choices)}; got {value!r}")
    for name in POSITIVE:
        sec, key = name.split(".")
        if getattr(getattr(cfg, sec), key) < 1:
            raise InputError(f"{where}: {name} must be >= 1")
    if not 0.0 <= cfg.bank.momentum < 1.0:
        raise InputError(f"{where}: bank.momentum must be in [0, 1)")
    if cfg.loss.temperature <= 0:
        raise InputError(f"{where}: loss.temperature must be > 0")
    least = temperature_floor(cfg.data.batch_size * (cfg.loss.nce_k + 1))
    if cfg.loss.kind == "nce" and not cfg.loss.temperature > least:
        raise InputError(f"{where}: loss.temperature must be > {least:.4g} "
                         f"for NCE with batch {cfg.data.batch_size} and K {cfg.loss.nce_k} "
                         "(exp(s / t) and the sum that estimates Z overflow below)")
    if cfg.optim.lr <= 0:
        raise InputError(f"{where}: optim.lr must be > 0")
    least = temperature_floor(cfg.train.knn_k)
    if not cfg.train.knn_temperature > least:
        raise InputError(f"{where}: train.knn_temperature must be > {least:.4g} with train.knn_k "
                         f"= {cfg.train.knn_k} (the kNN weights exp(s / t) overflow below)")
    if cfg.data.workers < AUTO_WORKERS:
        raise InputError(f"{where}: data.workers must be >= 0, or -1 for as many as the CPUs allow")
    if not 0.0 < cfg.data.crop_scale_min <= 1.0:
        raise InputError(f"{where}: data.crop_scale_min must be in (0, 1]")
    if cfg.train.eval_every < -1:
        raise InputError(f"{where}: train.eval_every must be >= 0, or -1 for a tenth of the run")
    if cfg.bank.cache_mb < 0:
        raise InputError(f"{where}: bank.cache_mb must be >= 0 (0: the default budget)")
    if cfg.model.arch == "small" and cfg.data.image_size < SMALL_MIN_SIDE:
        raise InputError(f"{where}: data.image_size must be >= {SMALL_MIN_SIDE} for the small "
                         "net (it halves the image 3 times)")


def _bundled() -> Path:
    """The bundled configs: a clone's (an editable install's), else where an installed wheel
    put them (pyproject.toml's data-files: under sys.prefix, or the user base of `--user`)."""
    import site

    here = Path(__file__).resolve().parent.parent / "configs"
    wheel = [Path(p) / "share" / "oocid" / "configs" for p in (sys.prefix, site.USER_BASE or "")]
    return next((p for p in [here, *wheel] if (p / "demo.toml").is_file()), here)


BUNDLED = _bundled()


def find_config(path: Path) -> Path:
    """`path`, else the bundled config it names from another folder (`imagenet_resnet18`,
    `configs/imagenet_resnet18.toml`); not found: the error lists the bundled ones."""
    if path.is_file():
        return path
    bundled = BUNDLED / (path.name if path.suffix == ".toml" else path.name + ".toml")
    if not path.is_absolute() and str(path.parent) in (".", "configs") and bundled.is_file():
        return bundled
    have = sorted(p.stem for p in BUNDLED.glob("*.toml")) if BUNDLED.is_dir() else []
    hint = f" (bundled configs: {', '.join(have)})" if have else ""
    raise InputError(f"{path}: config file not found{hint}")


def load_config(path: Path | None, overrides: list[str] | None = None,
                base: Config | None = None) -> Config:
    """Defaults (or `base`), then the TOML file (or a .json one with the same keys: a run's
    config.json), then `key=value` overrides (TOML values)."""
    cfg = base if base is not None else Config()
    if path is not None:
        path = find_config(Path(path))
        lang = "JSON" if path.suffix == ".json" else "TOML"
        try:
            text = path.read_text()
            data = json.loads(text) if lang == "JSON" else tomllib.loads(text)
        except ValueError as e:  # TOML/JSONDecodeError, UnicodeDecodeError, a > 4300-digit int
            raise InputError(f"{path}: not valid {lang}: {e}") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: not a config (a JSON object of sections)")
        apply_mapping(cfg, data, str(path))
    for item in overrides or []:
        apply_mapping(cfg, parse_override(item), f"override {item!r}")
    validate(cfg)
    return cfg


def parse_override(item: str) -> dict[str, Any]:
    """'optim.lr=0.1' -> {'optim': {'lr': 0.1}}; the value is parsed as TOML, else a string."""
    if "=" not in item:
        raise InputError(f"override {item!r}: expected SECTION.KEY=VALUE")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise InputError(f"override {item!r}: expected SECTION.KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except ValueError:  # TOMLDecodeError, or an int of > 4300 digits
        value = raw.strip()
    return {parts[0]: {parts[1]: value}}


def config_from_dict(data: dict[str, Any], where: str = "checkpoint") -> Config:
    """Rebuild a Config saved with `to_dict` (strict)."""
    return apply_mapping(Config(), json.loads(json.dumps(data)), where)


def eval_period(cfg: Config) -> int:
    """Epochs between the `--val` checks (0: after the last only): train.eval_every, or (-1) a
    tenth of the run's epochs, however many they are once every override is in."""
    every = cfg.train.eval_every
    return max(1, cfg.optim.epochs // 10) if every < 0 else every


SMALL_MIN_SIDE = 8  # the smallest crop the small net takes: 3 max-pools of 2 (models.py)


def demo_config() -> Config:
    """The bundled demo's settings (configs/demo.toml mirrors these; a test checks it).

    The best recipe for small grayscale images on 2 CPU cores in docs/method.md ("Notes from
    experiments"): the narrow conv net, exact softmax with t 0.1, crop scale 0.5-1, SGD lr 0.03
    with a cosine schedule."""
    cfg = Config()
    cfg.model.arch = "small"
    cfg.data.image_size = 28
    cfg.data.augment = "gray"
    cfg.data.crop_scale_min = 0.5
    cfg.data.in_memory = "yes"
    cfg.data.mean = [0.286]
    cfg.data.std = [0.353]
    cfg.data.workers = 0
    cfg.loss.kind = "softmax"
    cfg.loss.temperature = 0.1
    cfg.optim.epochs = 90
    cfg.optim.lr = 0.03
    cfg.optim.weight_decay = 5e-4
    cfg.optim.schedule = "cosine"
    cfg.train.knn_temperature = 0.07
    cfg.train.eval_every = 0
    return cfg


def auto_loss(fits: bool) -> LossKind:
    """The default loss.kind of a size regime, chosen by measurement (tools/bench_accuracy.py,
    docs/benchmarks.md): `fits` when the whole bank fits the device cache."""
    return "softmax" if fits else "infonce"
