"""Per-process cache of what a run needs and every node can rebuild: the model, its initial weights, the data."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import torch

from .data import NUM_CLASSES, Examples, FederatedData, load_federated_data, load_train_test
from .models import SplitModel, build_split_model


@dataclass(frozen=True)
class ClientTask:
    """A node's view of the run: a working model, the shared initial ``θ_c``, and the partitioned data."""

    model: SplitModel
    initial_client_state: dict[str, torch.Tensor]
    data: FederatedData


@lru_cache(maxsize=4)
def _client_task(
    model: str, cut_layer: int, seed: int, dataset: str, num_partitions: int, partitioner: str, alpha: float, test_fraction: float
) -> ClientTask:
    data = load_federated_data(dataset, num_partitions, partitioner, alpha, seed, test_fraction)
    split_model = build_split_model(model, cut_layer, data.num_classes, seed)
    initial = {k: v.clone() for k, v in split_model.client_state().items()}
    return ClientTask(split_model, initial, data)


def client_task(config: Mapping[str, Any], num_partitions: int) -> ClientTask:
    """The cached :class:`ClientTask` for a resolved run config (the model object is shared: load state into it)."""
    return _client_task(
        config["model"], config["cut-layer"], config["seed"], config["dataset"], num_partitions,
        config["partitioner"], config["dirichlet-alpha"], config["test-fraction"],
    )


def server_model_and_test(config: Mapping[str, Any]) -> tuple[SplitModel, Examples]:
    """A fresh model with the run's initial weights, and the held-out test examples."""
    _, test = load_train_test(config["dataset"], config["seed"], config["test-fraction"])
    model = build_split_model(config["model"], config["cut-layer"], NUM_CLASSES[config["dataset"]], config["seed"])
    return model, test
