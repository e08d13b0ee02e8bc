"""Config loading: strict keys and types, overrides, the shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from oocid.config import Config, config_from_dict, demo_config, load_config
from oocid.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_imagenet_settings() -> None:
    c = Config()
    assert (c.loss.nce_k, c.loss.temperature, c.bank.momentum, c.model.dim) == (4096, 0.07, 0.5, 128)
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (0.03, 0.9, 1e-4)
    assert c.optim.milestones == [120, 160] and c.optim.epochs == 200


def test_unknown_key_and_wrong_type_are_errors(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(InputError, match=r"c\.toml.*unknown config key optim\.learning_rate"):
        load_config(p)
    p.write_text("[optim]\nlr = \"fast\"\n")
    with pytest.raises(InputError, match="optim.lr must be a number"):
        load_config(p)
    p.write_text("[nope]\nx = 1\n")
    with pytest.raises(InputError, match=r"unknown config section \[nope\]"):
        load_config(p)
    p.write_text("[loss]\nkind = \"magic\"\n")
    with pytest.raises(InputError, match="loss.kind must be one of"):
        load_config(p)
    p.write_text("not toml = = =")
    with pytest.raises(InputError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_overrides() -> None:
    c = load_config(None, ["optim.lr=0.1", "loss.kind=softmax", "optim.milestones=[1, 2]"])
    assert c.optim.lr == 0.1 and c.loss.kind == "softmax" and c.optim.milestones == [1, 2]
    with pytest.raises(InputError):
        load_config(None, ["optim.lr"])
    with pytest.raises(InputError):
        load_config(None, ["optim.epochs=1.5"])


def test_round_trip_through_dict() -> None:
    c = demo_config()
    assert config_from_dict(c.to_dict()).to_dict() == c.to_dict()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    load_config(path)


def test_demo_toml_mirrors_demo_config() -> None:
    assert load_config(ROOT / "configs" / "demo.toml").to_dict() == demo_config().to_dict()


def test_data_workers_auto_by_default_and_negative_counts_refused(monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    import oocid.config as config

    assert Config().data.workers == config.AUTO_WORKERS == -1
    for cpus, want in ((1, 0), (2, 1), (3, 2), (16, 4)):
        monkeypatch.setattr(config.os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)),
                            raising=False)
        assert config.data_workers(-1) == want
    assert (config.data_workers(0), config.data_workers(7)) == (0, 7)  # set ones are kept
    assert load_config(None, ["data.workers=-1"]).data.workers == -1
    with pytest.raises(InputError, match=r"data\.workers must be >= 0, or -1"):
        load_config(None, ["data.workers=-2"])


def test_pyproject_installs_every_bundled_config() -> None:
    """The wheel's data-files list the configs by hand: it must name every one of configs/."""
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"configs/([a-z0-9_]+\.toml)"', text))
    assert listed == {p.name for p in (ROOT / "configs").glob("*.toml")}


def test_a_bundled_config_is_found_by_name_from_any_folder(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's `--config configs/imagenet_resnet18.toml` run outside the clone, or the
    bare name, loads the bundled file; a name that is none lists the bundled ones."""
    monkeypatch.chdir(tmp_path)
    want = load_config(ROOT / "configs" / "cifar10_resnet18.toml").to_dict()
    for given in ("configs/cifar10_resnet18.toml", "cifar10_resnet18", "cifar10_resnet18.toml"):
        assert load_config(Path(given)).to_dict() == want
    (tmp_path / "cifar10_resnet18.toml").write_text("[optim]\nepochs = 3\n")  # a file here wins
    assert load_config(Path("cifar10_resnet18.toml")).optim.epochs == 3
    with pytest.raises(InputError, match=r"nope\.toml: config file not found \(bundled "
                                         r"configs: .*demo, .*imagenet_resnet18"):
        load_config(Path("nope.toml"))
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "elsewhere" / "demo.toml")  # a path elsewhere is not a name


def test_a_negative_cache_and_a_crop_too_small_for_the_small_net_are_refused() -> None:
    with pytest.raises(InputError, match=r"bank\.cache_mb must be >= 0"):
        load_config(None, ["bank.cache_mb=-5"])
    with pytest.raises(InputError, match=r"data\.image_size must be >= 8 for the small net"):
        load_config(None, ['model.arch="small"', "data.image_size=7"])
    assert load_config(None, ['model.arch="small"', "data.image_size=8"]).data.image_size == 8


def test_a_runs_config_json_loads_as_a_config_file(tmp_path: Path) -> None:
    """`train` writes RUN/config.json; --config takes it back, overrides on top, with the
    same strict keys as TOML; a file that is not JSON (or not an object) is one error."""
    cfg = demo_config()
    cfg.optim.epochs, cfg.data.batch_size = 7, 64
    run = tmp_path / "config.json"
    run.write_text(cfg.to_json() + "\n")
    assert load_config(run).to_dict() == cfg.to_dict()
    assert load_config(run, ["optim.epochs=9"]).optim.epochs == 9
    run.write_text('{"optim": {"learning_rate": 0.1}}')
    with pytest.raises(InputError, match=r"config\.json.*unknown config key optim\.learning_rate"):
        load_config(run)
    for text, what in (("[optim]\nlr = 0.1\n", "not valid JSON"), ("[1, 2]", "not a config")):
        run.write_text(text)
        with pytest.raises(InputError, match=rf"config\.json: {what}"):
            load_config(run)


def test_a_knn_temperature_whose_weights_overflow_is_refused() -> None:
    """k weights exp(s / t), s <= 1, sum to a finite float32 for every t above the floor
    (0.0120 at the default k 200) and to inf just below it; 0 is refused too."""
    import torch

    from oocid.config import temperature_floor
    from oocid.method.knn import knn_scores_from_topk

    floor = temperature_floor(200)
    assert 0.0119 < floor < 0.0121
    ones, labels = torch.ones(1, 200), torch.zeros(1, 200, dtype=torch.int64)
    assert torch.isfinite(knn_scores_from_topk(ones, labels, 200, floor * 1.001, 2)).all()
    assert torch.isinf(knn_scores_from_topk(ones, labels, 200, floor * 0.99, 2)).any()
    for t in ("0.01", "0", "-1"):
        with pytest.raises(InputError, match=r"train\.knn_temperature must be > 0\.01199 with "
                                             r"train\.knn_k = 200 \(the kNN weights"):
            load_config(None, [f"train.knn_temperature={t}"])
    assert load_config(None, ["train.knn_temperature=0.02"]).train.knn_temperature == 0.02
    cfg = load_config(None, ["train.knn_k=1", "train.knn_temperature=0.0115"])  # k 1: 0.01127
    assert cfg.train.knn_k == 1


def test_an_nce_temperature_whose_z_sum_overflows_is_refused() -> None:
    """NCE's exp(s / t), summed over the B (K + 1) scores of a step to estimate Z: at the
    paper's B 256, K 4096 the sum overflows float32 at t 0.01336; the softmax losses take
    log-sum-exp and have no such floor."""
    with pytest.raises(InputError, match=r"loss\.temperature must be > 0\.01336 for NCE with "
                                         r"batch 256 and K 4096 \(exp\(s / t\) and the sum"):
        load_config(None, ['loss.kind="nce"', "loss.temperature=0.0133"])
    assert load_config(None, ['loss.kind="nce"', "loss.temperature=0.0134"]).loss.kind == "nce"
    assert load_config(None, ['loss.kind="softmax"', "loss.temperature=0.005"]).loss.kind \
        == "softmax"
