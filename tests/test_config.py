"""Run-config defaults and validation."""

import tomllib

import pytest

from hosfl_flower.config import DEFAULTS, ConfigError, parse_run_config_overrides, resolve_run_config

from .conftest import ROOT, run_simulation_cli


def _flatten(table, prefix=""):
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_pyproject_holds_every_key_with_its_default():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert _flatten(pyproject["tool"]["flwr"]["app"]["config"]) == DEFAULTS


BAD_VALUES = [
    ("zo.num-perturbations", -1, "must be an integer >= 0"),
    ("zo.num-perturbations", 2.5, "must be an integer"),
    ("zo.mu", 0.0, "must be a number >= 1e-07 and <= 1"),
    ("zo.mu", 1e-300, "must be a number >= 1e-07"),
    ("zo.num-perturbations", 10**7, "must be an integer >= 0 and <= 10000"),
    ("aggregation.rule", "mode", "must be one of mean, median, trimmed-mean, clipped-mean"),
    ("aggregation.trim-fraction", 0.6, "<= 0.5"),
    ("zo.max-update-norm", 0.0, "must be a number > 0"),
    ("client.optimizer", "lion", "must be one of sgd, adamw"),
    ("zo.estimator", "backward", "must be one of forward, central, jvp"),
    ("zo.directions", "uniform", "must be one of gaussian, rademacher"),
    ("strategy", "fedsgd", "must be one of"),
    ("partitioner", "shards", "must be one of iid, dirichlet, inner-dirichlet, pathological, shard, linear, square"),
    ("partition.group-mode", "loose", "must be one of allow-smaller, allow-bigger, drop-reminder, strict"),
    ("tokenizer", 3, "must be a string"),
    ("num-server-rounds", 0, "must be an integer >= 1"),
    ("cut-layer", 7, "within the cnn's blocks 1..4"),
    ("test-fraction", 1.5, "must be a number > 0 and <= 0.9"),
    ("final-sync", "yes", "must be true or false"),
    ("server.lr", "fast", "must be a number"),
    ("no-such-key", 1, "unknown key"),
    ("min-replies", 4, "must be <= clients-per-round (3)"),
    ("min-replies", 0, "must be an integer >= 1"),
    ("faults.failure-rate", 1.5, "must be a number >= 0 and <= 1"),
    ("checkpoint-every", -2, "must be an integer >= 0"),
    ("resume", 1, "must be true or false"),
]

CROSS_KEY_VALUES = [
    (
        "cut-layer",
        4,
        "must be within pretrained-tiny-llama's blocks 1..3",
        {"model": "pretrained-tiny-llama", "dataset": "sentiment"},
    ),
    ("model", "pretrained-nope", "unknown pretrained model", {"dataset": "sentiment"}),
    ("zo.clip-grad-norm", -1.0, "must be a number >= 0", {}),
    ("client.lr-schedule", "linear", "must be one of constant, cosine", {}),
    ("checkpoint-dir", "", "needs a checkpoint directory", {"resume": True}),
    ("cut-layer", 3, "within tiny-llama's blocks 1..2", {"model": "tiny-llama", "dataset": "sentiment"}),
    ("heron.upload-every", 5, "must be <= heron.local-steps (4)", {}),
    ("min-nodes", 2, "must be 0 or >= clients-per-round (3)", {}),
    ("data.eval-split", "validation", "digits has no splits; use held-out or leave it empty", {}),
    ("data.eval-split", "test", "sentiment has no splits", {"model": "tiny-llama", "dataset": "sentiment"}),
    ("partition.shard-size", 0, "partitioner=shard needs partition.shard-size", {"partitioner": "shard"}),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as error:
        resolve_run_config({key: value})
    text = str(error.value)
    assert key in text and message in text and "\n" not in text


@pytest.mark.parametrize("key,value,message,others", CROSS_KEY_VALUES)
def test_cross_key_rules_name_the_key(key, value, message, others):
    with pytest.raises(ConfigError) as error:
        resolve_run_config({**others, key: value})
    text = str(error.value)
    assert f"{key}={value!r}" in text and message in text and "\n" not in text


def test_every_protocol_supports_checkpoints():
    for strategy in ("fedavg", "heron-sfl", "splitfed-v1"):
        assert resolve_run_config({"strategy": strategy, "checkpoint-every": 5})["checkpoint-every"] == 5


def test_overrides_parse_like_flwr_run():
    assert parse_run_config_overrides("num-server-rounds=3 client.optimizer='adamw' zo.mu=1e-4") == {
        "num-server-rounds": 3,
        "client.optimizer": "adamw",
        "zo.mu": 1e-4,
    }
    assert resolve_run_config({"server.lr": 1})["server.lr"] == 1.0


def test_flower_simulation_stops_on_a_bad_value_with_one_line():
    process = run_simulation_cli(["--app", "hosfl_flower.app", "--run-config", "zo.num-perturbations=-1"], timeout=120)
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and "zo.num-perturbations=-1" in lines[0] and ">= 0" in lines[0]
