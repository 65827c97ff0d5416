import tomllib
from pathlib import Path

import pytest

from fedlora.cli import build_parser, config_from_args
from shared.config import FedConfig
from shared.errors import FedLoraError


def test_pyproject_run_config_mirrors_defaults():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == FedConfig().to_run_config()


def test_run_config_round_trip():
    cfg = FedConfig(model="tiny-bert", rounds=7, dp=False, delta=1e-6, partition="dirichlet:0.3", partition_by="")
    assert FedConfig.from_run_config(cfg.to_run_config()) == cfg


def _parse(*argv):
    return config_from_args(build_parser().parse_args(["simulate", *argv]))


def test_cli_defaults_one_client_per_brand():
    cfg = _parse()
    assert (cfg.partition_by, cfg.num_clients, cfg.dp, cfg.secure_agg, cfg.lora) == ("brand", 6, True, True, "ffa")


def test_cli_centralized_baseline_pools_the_same_data():
    cfg = _parse("--no-dp", "--num-clients", "1")
    assert (cfg.partition_by, cfg.partition, cfg.num_clients, cfg.brands, cfg.dp) == ("", "iid", 1, 6, False)


@pytest.mark.parametrize("argv, message", [
    (["--lora", "full"], "--lora"),
    (["--partition", "dirichlet:-1"], "positive ALPHA"),
    (["--partition", "shards"], "--partition"),
    (["--fraction", "1.5"], "--fraction"),
    (["--target-epsilon", "0"], "epsilon target cannot be met"),
])
def test_cli_rejects_bad_settings(argv, message):
    with pytest.raises(FedLoraError, match=message):
        _parse(*argv)


def test_benchmark_settings_parse_once_and_a_later_pair_wins_however_it_is_spelt():
    import pytest

    from simulations.bench_accuracy import _config

    cfg = _config(["lora_layers=4", "rounds=3", "lora-layers=2", "eval-every=2"])
    assert (cfg.lora_layers, cfg.rounds, cfg.eval_every) == (2, 3, 2)
    with pytest.raises(SystemExit, match="unknown setting"):
        _config(["no_such_setting=1"])
