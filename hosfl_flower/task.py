"""From a resolved run config to what a run needs, cached per process: the model, its initial
weights, the data. Every node rebuilds the same initial model from the run's seed.

A ``pretrained-*`` model name stands for a checkpoint directory built on this machine
(:mod:`hosfl_flower.pretrain`); everything downstream loads it like any local checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from .data import (
    PARTITION_OPTIONS,
    DataInfo,
    DataOptions,
    Examples,
    FederatedData,
    ImageSpec,
    TextSpec,
    is_image_dataset,
    load_federated_data,
    load_test,
)
from .models import SplitModel, build_split_model


def model_source(config: Mapping[str, Any]) -> str:
    """What the model loads from: the config's ``model``, or for a ``pretrained-*`` name its cached
    checkpoint directory (pretrained on first use)."""
    name = config["model"]
    if not name.startswith("pretrained-"):
        return name
    from .pretrain import ensure_pretrained

    return ensure_pretrained(name, config["pretrain.cache-dir"])


def text_spec(config: Mapping[str, Any]) -> TextSpec | None:
    """The tokenisation settings of a text dataset (``None`` for digits).

    The tokenizer is the ``tokenizer`` key, else the model's own source; ``sentiment`` keeps its
    word-level tokenizer unless ``tokenizer`` names one.
    """
    if config["dataset"] == "digits":
        return None
    words = tuple(w for w in config["data.label-words"].split(",") if w.strip())  # spaces are part of a word
    tokenizer = config["tokenizer"] if config["dataset"] == "sentiment" else config["tokenizer"] or model_source(config)
    return TextSpec(
        task=config["task"],
        max_length=config["max-length"],
        tokenizer=tokenizer,
        text_column=config["data.text-column"],
        template=config["data.template"],
        label_words=words,
    )


def data_options(config: Mapping[str, Any]) -> DataOptions:
    """Where a hub or local dataset's evaluation split and columns are."""
    return DataOptions(
        subset=config["data.subset"],
        eval_split=config["data.eval-split"],
        label_column=config["data.label-column"],
        image_column=config["data.image-column"],
    )


def image_spec(config: Mapping[str, Any]) -> ImageSpec | None:
    """The model's image size, channels and normalisation for an image dataset (``None`` for other data):
    :func:`~hosfl_flower.models.hf.vision.vision_input_spec`."""
    if not is_image_dataset(config["dataset"], data_options(config)):
        return None
    from .models.hf.vision import vision_input_spec
    from .options import ConfigError

    source = model_source(config)
    try:
        return vision_input_spec(source)
    except (OSError, ValueError) as error:
        reason = f"gives no image settings for image dataset {config['dataset']}: {' '.join(str(error).split())}"
        raise ConfigError("model", config["model"], reason) from error


def partition_settings(config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The ``partition.*`` keys of a run config, as :func:`~hosfl_flower.data.load_federated_data` takes them."""
    return tuple((key, config[key]) for key in PARTITION_OPTIONS if key.startswith("partition."))


def build_model(config: Mapping[str, Any], info: DataInfo) -> SplitModel:
    """The split model the config names, with the run's initial weights."""
    lora = None
    if config["lora.rank"] > 0:
        from .models.hf import LoraSettings

        targets = tuple(t.strip() for t in config["lora.targets"].split(",") if t.strip())
        lora = LoraSettings(config["lora.rank"], config["lora.alpha"], targets)
    return build_split_model(
        model_source(config),
        config["cut-layer"],
        info.num_classes,
        config["seed"],
        task=config["task"],
        lora=lora,
        verbalizer_ids=info.verbalizer_ids,
        client_batchnorm=config["client.batchnorm"],
        vocab_size=_tiny_vocab_size(config, info),
    )


def _tiny_vocab_size(config: Mapping[str, Any], info: DataInfo) -> int | None:
    """A tiny transformer takes the vocabulary of a ``tokenizer`` the config names (``None``: its own)."""
    if not (config["tokenizer"] and config["model"].startswith("tiny-")) or info.vocab_size is None:
        return None
    from .models.hf.configs import TINY_CONFIGS

    return info.vocab_size if config["model"] in TINY_CONFIGS else None


@dataclass(frozen=True)
class ClientTask:
    """A node's view of the run: a working model, the shared initial ``θ_c``, and the partitioned data."""

    model: SplitModel
    initial_client_state: dict[str, torch.Tensor]
    data: FederatedData


_CLIENT_KEYS = (
    "model",
    "pretrain.cache-dir",
    "cut-layer",
    "task",
    "seed",
    "dataset",
    *PARTITION_OPTIONS,
    "test-fraction",
    "max-length",
    "tokenizer",
    "data.subset",
    "data.eval-split",
    "data.text-column",
    "data.label-column",
    "data.image-column",
    "data.template",
    "data.label-words",
    "lora.rank",
    "lora.alpha",
    "lora.targets",
    "client.batchnorm",
)


@lru_cache(maxsize=4)
def _client_task(items: tuple, num_partitions: int) -> ClientTask:
    config = dict(items)
    data = load_federated_data(
        config["dataset"],
        num_partitions,
        config["partitioner"],
        config["dirichlet-alpha"],
        config["seed"],
        config["test-fraction"],
        text_spec(config),
        partition=partition_settings(config),
        image=image_spec(config),
        options=data_options(config),
    )
    model = build_model(config, data.info)
    initial = {k: v.clone() for k, v in model.client_state().items()}
    return ClientTask(model, initial, data)


def partition_sizes(config: Mapping[str, Any], num_partitions: int) -> list[int]:
    """Each partition's number of examples under a resolved run config (what the server holds nodes' claims against)."""
    data = client_task(config, num_partitions).data
    return [data.partition_size(partition_id) for partition_id in range(num_partitions)]


def client_task(config: Mapping[str, Any], num_partitions: int) -> ClientTask:
    """The cached :class:`ClientTask` for a resolved run config (the model object is shared: load state into it)."""
    return _client_task(tuple((k, config[k]) for k in _CLIENT_KEYS), num_partitions)


def server_model_and_test(config: Mapping[str, Any]) -> tuple[SplitModel, Examples]:
    """A fresh model with the run's initial weights, and the evaluation examples."""
    test, info = load_test(
        config["dataset"],
        config["seed"],
        config["test-fraction"],
        text_spec(config),
        image=image_spec(config),
        options=data_options(config),
    )
    return build_model(config, info), test
