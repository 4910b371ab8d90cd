"""Every run-config key, its default and its validation, in one place.

Keys arrive flattened (``zo.num-perturbations``) from ``[tool.flwr.app.config]``, ``flwr run -c``,
or ``flower-simulation --run-config``. :func:`resolve_run_config` merges them over the defaults and
checks every value before any work starts; a bad value raises :class:`ConfigError` with one line
naming the key, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .data import PARTITION_OPTIONS, PartitionSpec
from .data.sources import HELD_OUT, check_bundled_eval_split
from .devices import DEVICE_HELP, DEVICE_KEYS, PRECISIONS, check_precision, resolve_device
from .models import MODEL_FAMILIES
from .models.base import TASKS
from .options import ConfigError, Option
from .protocols.base import RunSettings
from .protocols.registry import protocol_options, protocols
from .split_server import PLACEMENTS, SERVER_OPTIMIZERS

DEFAULT_CUT = 2
"""What ``cut-layer=0`` means for a transformer (a registered model family names its own)."""


CORE_OPTIONS: dict[str, Option] = {
    "strategy": Option("hosfl", "which registered protocol to run"),
    "model": Option("cnn", "cnn, resnet, a tiny-* transformer, or a Hugging Face hub name or local directory"),
    "pretrain.cache-dir": Option(
        "", "where pretrained-* checkpoints are built and cached (empty: $HOSFL_FLOWER_CACHE or ~/.cache/hosfl-flower)"
    ),
    "cut-layer": Option(
        0,
        "the client segment is the model's first cut-layer blocks (0: the model's default cut, 3 for cnn, 2 otherwise)",
        minimum=0,
    ),
    "task": Option("classification", "transformer task: classification, causal-lm or verbalizer", choices=TASKS),
    "dataset": Option(
        "digits",
        "digits, sentiment (both bundled), a Hugging Face hub dataset, or a local directory (imagefolder, parquet, "
        "CSV or JSON files, or save_to_disk output) or file",
    ),
    "max-length": Option(24, "token length text is padded or truncated to", minimum=2),
    "tokenizer": Option(
        "", "Hugging Face tokenizer (hub name or directory) of text data (empty: the model's own; sentiment: its word-level one)"
    ),
    "data.subset": Option("", "configuration of a hub dataset (e.g. rte of nyu-mll/glue)"),
    "data.eval-split": Option(
        "",
        f"split evaluated on (empty: validation, else test, else held out; {HELD_OUT}: a test-fraction of the training "
        "split, always for digits and sentiment)",
    ),
    "data.text-column": Option("text", "text column of a Hugging Face dataset (the template's {text})"),
    "data.label-column": Option(
        "", "label column of a Hugging Face dataset (empty: its one ClassLabel column, else one named label, labels, ...)"
    ),
    "data.image-column": Option("", "image column of a Hugging Face dataset (empty: its one Image column)"),
    "data.template": Option("{text}", "prompt template applied to each text ({text}: the text column; {name}: column name)"),
    "data.label-words": Option("", "comma-separated verbalizer words, one per class (task=verbalizer)"),
    "lora.rank": Option(0, "LoRA rank on both segments of a transformer (0: no LoRA)", minimum=0),
    "lora.alpha": Option(16.0, "LoRA alpha", minimum=0.0, exclusive_minimum=True),
    "lora.targets": Option("", "comma-separated LoRA target modules (empty: the family's default)"),
    **PARTITION_OPTIONS,
    "test-fraction": Option(
        0.2, "held-out share of the data for central evaluation", minimum=0.0, maximum=0.9, exclusive_minimum=True
    ),
    "min-nodes": Option(0, "wait for this many nodes before round 1 (0: clients-per-round)", minimum=0),
    "eval-every": Option(1, "central evaluation every this many rounds", minimum=1),
    "eval-batch-size": Option(512, "batch size of central evaluation", minimum=1),
    "server.optimizer": Option("adamw", "server optimizer", choices=SERVER_OPTIMIZERS),
    "server.lr": Option(0.02, "server learning rate", minimum=0.0),
    "server.momentum": Option(0.9, "server SGD momentum", minimum=0.0, maximum=1.0),
    "server.weight-decay": Option(0.0, "server weight decay", minimum=0.0),
    "split-server.placement": Option(
        "local", "where the split server runs: in the ServerApp or as a Ray actor", choices=PLACEMENTS
    ),
    "split-server.device": Option(
        "cpu",
        f"where the split server keeps θ_s and its optimizer and computes: {DEVICE_HELP}; batches move to it, λ "
        "comes back as CPU float32, checkpoints hold CPU tensors",
    ),
    "split-server.precision": Option(
        "fp32",
        "autocast of the split server's first-order steps: fp32 (none), bf16 (CPU or CUDA) or fp16 (CUDA, with a "
        "gradient scaler); evaluation and ZO-SFL's loss differences stay float32",
        choices=PRECISIONS,
    ),
    "split-server.num-gpus": Option(
        1.0,
        "placement='ray' with a CUDA split-server.device: the GPUs its Ray actor reserves (a fraction shares one; 0: "
        "none reserved, leaving every GPU to the ClientApp actors)",
        minimum=0.0,
    ),
    "split-server.ray-address": Option(
        "",
        "placement='ray': the address of an existing Ray cluster the ServerApp connects to (host:port of its head, "
        "e.g. 127.0.0.1:6379, or auto; Flower's deployment runtime); empty: the simulation engine's Ray",
    ),
    "split-server.num-cpus": Option(
        0.0,
        "placement='ray': the CPUs the split server's Ray actor (and each SplitFed V1 copy) reserves (0: none, as "
        "under the simulation engine, whose ClientApp actors take every CPU; on a cluster 1 or more)",
        minimum=0.0,
    ),
    "client.device": Option(
        "cpu",
        f"where each node runs its forward passes and client steps: {DEVICE_HELP}; θ_c stays float32 on the CPU and a "
        "device computes on a copy refreshed from it",
    ),
    "torch-threads": Option(
        1, "torch intra-op threads of the server and every client (results are bit-exact per setting)", minimum=1
    ),
    "round-timeout": Option(600.0, "seconds to wait for replies in one exchange", minimum=0.0, exclusive_minimum=True),
    "max-skipped-rounds": Option(10, "stop with an error after this many skipped rounds in a row", minimum=1),
    "checkpoint-every": Option(0, "write a checkpoint every this many rounds (0: never)", minimum=0),
    "checkpoint-dir": Option("checkpoints", "where checkpoints are written and resumed from"),
    "resume": Option(False, "continue the run saved in checkpoint-dir"),
    "faults.failure-rate": Option(
        0.0, "fault injection: share of protocol replies that fail (testing only)", minimum=0.0, maximum=1.0
    ),
    "faults.nan-partition": Option(-1, "fault injection: this partition's replies carry NaN values (-1: none)", minimum=-1),
    "faults.wrong-count-partition": Option(
        -1, "fault injection: this partition replies with one value too few (-1: none)", minimum=-1
    ),
    "faults.byzantine-partition": Option(
        -1, "fault injection: this partition attacks the aggregation every round (-1: none)", minimum=-1
    ),
    "faults.byzantine-mode": Option(
        "huge",
        "how the byzantine partition attacks: huge (in-bound values of 1e11), flip (the honest update sign-flipped and "
        "tripled) or mixed (huge on odd rounds, flip on even ones)",
        choices=("huge", "flip", "mixed"),
    ),
    "client.batchnorm": Option(
        "frozen",
        "image classifiers: client BatchNorm frozen (eval mode, affine parameters fixed, as the official HO-SFL code) or train",
        choices=("frozen", "train"),
    ),
    "results-dir": Option("results", "where per-round results and the final model are written"),
}

"""The run-wide keys that belong to no protocol (``RunSettings`` and each protocol's settings add theirs)."""


def all_options() -> dict[str, Option]:
    """Every run-config key: the core ones, :class:`RunSettings`' and every registered protocol's."""
    protocols()  # the package's own protocols register on first use
    return {**CORE_OPTIONS, **dict(RunSettings.options()), **protocol_options()}


OPTIONS = all_options()
"""The run-config keys of the package's own protocols (a protocol registered later adds its keys to :func:`all_options`)."""

DEFAULTS: dict[str, Any] = {key: option.default for key, option in OPTIONS.items()}
"""Every key with its default; ``[tool.flwr.app.config]`` in pyproject.toml holds the same table."""


def resolve_run_config(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``layers`` (later wins) over the defaults and validate every key.

    Unknown keys and bad values raise :class:`ConfigError`.
    """
    options = all_options()
    merged: dict[str, Any] = {key: option.default for key, option in options.items()}
    for layer in layers:
        for key, value in layer.items():
            if key not in options:
                raise ConfigError(key, value, f"unknown key; known keys: {', '.join(sorted(options))}")
            merged[key] = value
    resolved = {key: options[key].check(key, value) for key, value in merged.items()}
    registered = protocols()
    if resolved["strategy"] not in registered:
        raise ConfigError("strategy", resolved["strategy"], f"must be one of {', '.join(registered)}")
    if resolved["cut-layer"] == 0:
        family = MODEL_FAMILIES.get(resolved["model"])
        resolved["cut-layer"] = family.default_cut if family is not None else DEFAULT_CUT
    for key in DEVICE_KEYS:  # checked against this machine; auto becomes cuda or cpu
        resolved[key] = resolve_device(key, resolved[key])
    check_precision(resolved["split-server.precision"], resolved["split-server.device"])
    _check_cross_keys(resolved)
    for spec in registered.values():  # each protocol's own checks across its keys
        spec.settings.from_config(resolved)
    return resolved


def _check_cross_keys(config: Mapping[str, Any]) -> None:
    model, dataset = config["model"], config["dataset"]
    if not model:
        raise ConfigError("model", model, "must name a model")
    family = MODEL_FAMILIES.get(model)
    if family is not None:
        if not 1 <= config["cut-layer"] <= family.num_blocks:
            raise ConfigError("cut-layer", config["cut-layer"], f"must be within the {model}'s blocks 1..{family.num_blocks}")
        if family.datasets is not None and dataset not in family.datasets:
            raise ConfigError("dataset", dataset, f"the {model} model needs dataset={' or '.join(family.datasets)}")
        if config["task"] not in family.tasks:
            raise ConfigError("task", config["task"], f"the {model} model does {', '.join(family.tasks)} only")
    else:
        vision = model in _vision_tiny_configs()
        if dataset == "digits" and not vision:
            raise ConfigError("dataset", dataset, f"transformer {model} needs a text dataset (sentiment or a Hugging Face one)")
        if vision:
            if dataset in ("digits", "sentiment"):
                reason = f"the image classifier {model} needs an image dataset (a hub name or a directory)"
                raise ConfigError("dataset", dataset, reason)
            if config["task"] != "classification":
                raise ConfigError("task", config["task"], f"the image classifier {model} does classification only")
        if model.startswith("tiny-"):
            _check_tiny(model, config["cut-layer"])
        if model.startswith("pretrained-"):
            from .pretrain import PRETRAINED_MODELS

            if model not in PRETRAINED_MODELS:
                raise ConfigError("model", model, f"unknown pretrained model; allowed: {', '.join(sorted(PRETRAINED_MODELS))}")
            blocks = PRETRAINED_MODELS[model].num_blocks
            if not 1 <= config["cut-layer"] < blocks:
                raise ConfigError("cut-layer", config["cut-layer"], f"must be within {model}'s blocks 1..{blocks - 1}")
        if config["task"] == "verbalizer" and dataset != "sentiment" and not config["data.label-words"]:
            raise ConfigError("data.label-words", "", "task=verbalizer needs one label word per class")
    PartitionSpec.from_config(config)
    check_bundled_eval_split(dataset, config["data.eval-split"])
    if config["min-replies"] > config["clients-per-round"]:
        raise ConfigError("min-replies", config["min-replies"], f"must be <= clients-per-round ({config['clients-per-round']})")
    if config["checkpoint-every"] or config["resume"]:
        key = "resume" if config["resume"] else "checkpoint-every"
        if not config["checkpoint-dir"]:
            raise ConfigError("checkpoint-dir", "", f"{key} needs a checkpoint directory")
    _check_ray_address(config["split-server.ray-address"], config["split-server.placement"])
    if config["min-nodes"] and config["min-nodes"] < config["clients-per-round"]:
        raise ConfigError("min-nodes", config["min-nodes"], f"must be 0 or >= clients-per-round ({config['clients-per-round']})")


def _check_ray_address(address: str, placement: str) -> None:
    """``split-server.ray-address``: empty, ``auto``, a ``ray://`` address, or ``host:port``, with placement='ray'."""
    key = "split-server.ray-address"
    if not address:
        return
    if placement != "ray":
        raise ConfigError(key, address, "needs split-server.placement='ray'")
    if address == "auto" or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(key, address, "must be host:port of the cluster's head (e.g. 127.0.0.1:6379), auto or ray://...")


def _vision_tiny_configs() -> dict:
    from .models.hf.vision import VISION_TINY_CONFIGS  # transformers is imported only for Hugging Face runs

    return VISION_TINY_CONFIGS


def _check_tiny(model: str, cut_layer: int) -> None:
    from .models.hf.configs import TINY_CONFIGS
    from .models.hf.vision import vision_num_blocks

    vision = _vision_tiny_configs()
    if model not in TINY_CONFIGS and model not in vision:
        allowed = ", ".join(sorted([*TINY_CONFIGS, *vision]))
        raise ConfigError("model", model, f"unknown tiny model; allowed: {allowed}")
    blocks = vision_num_blocks(vision[model]()) if model in vision else TINY_CONFIGS[model]().num_hidden_layers
    if not 1 <= cut_layer < blocks:
        raise ConfigError("cut-layer", cut_layer, f"must be within {model}'s blocks 1..{blocks - 1}")


def parse_run_config_overrides(text: str) -> dict[str, Any]:
    """Parse ``"key=value key2='text'"`` (TOML values, as ``flwr run -c`` takes them)."""
    import shlex
    import tomllib

    overrides: dict[str, Any] = {}
    for item in shlex.split(text, posix=False):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(item, None, "overrides take the form key=value")
        key = key.strip()
        try:
            overrides[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key] = raw.strip()
        options = all_options()
        if key not in options:
            raise ConfigError(key, overrides[key], f"unknown key; known keys: {', '.join(sorted(options))}")
    return overrides
