"""FedAvg's client part: the node's handler of ``train.fedavg``, which is :meth:`HOSFLClient.fit`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ...node.client import HOSFLClient
from ..messages import Payload
from ..registry import Handler
from .config import FedAvgSettings
from .messages import FedAvgReply, FedAvgRequest

if TYPE_CHECKING:
    from ...memory import MemoryCase


def train(client: HOSFLClient, request: FedAvgRequest, server_round: int) -> FedAvgReply:
    """``local-steps`` SGD steps of the whole model at ``lr`` through the NumPyClient ``fit``.

    The reply's tensors are views of the node's model (no copy): the link copies them as it sends.
    """
    start = time.perf_counter()
    keys = list(client.model.state_dict())
    config = {"local-steps": request.local_steps, "lr": request.lr, "server-round": server_round}
    arrays, num_examples, metrics = client.fit([request.weights[key].numpy() for key in keys], config)
    weights = {key: torch.from_numpy(array) for key, array in zip(keys, arrays)}
    return FedAvgReply(weights, num_examples, float(metrics["train-loss"]), compute_seconds=time.perf_counter() - start)


HANDLERS: dict[type[Payload], Handler] = {FedAvgRequest: train}


def memory_step(case: MemoryCase) -> Callable[[], FedAvgReply]:
    """One FedAvg round of a node for the memory benchmark: receiving the whole model, one local step."""
    lr = FedAvgSettings.from_config(case.cfg).lr
    whole = {key: value.detach().clone() for key, value in case.task.model.state_dict().items()}

    def step() -> FedAvgReply:
        request = FedAvgRequest({key: value.clone() for key, value in whole.items()}, 1, lr)
        return train(case.new_client(), request, case.server_round)

    return step
