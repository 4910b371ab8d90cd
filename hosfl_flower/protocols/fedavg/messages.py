"""FedAvg's message: ``train.fedavg`` (the whole model and how to train it down; the trained model, the
number of examples and the local loss up). docs/protocols.md, "FedAvg"."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from flwr.app import ConfigRecord, RecordDict

from ...records import tensors_to_record
from ..messages import (
    Payload,
    Reply,
    check_state,
    compute_seconds,
    layout_of,
    require_int,
    require_number,
    require_record,
    require_scalars,
    require_tensors,
)


@dataclass
class FedAvgReply(Reply):
    """The node's locally trained whole model, its number of examples and its mean local loss."""

    weights: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float

    categories: ClassVar[Mapping[str, str]] = {"arrays": "model_up", "meta": "other"}
    attack_fields: ClassVar[tuple[str, ...]] = ("weights",)

    def to_record(self) -> RecordDict:
        meta = self.meta(**{"num-examples": self.num_examples, "train-loss": self.train_loss})
        return RecordDict({"arrays": tensors_to_record(self.weights), "meta": meta})

    @classmethod
    def from_record(cls, content, request: Payload | None = None, spec=None) -> FedAvgReply:
        """The trained model must have the layout of the request's (and be finite)."""
        meta = require_record(content, "meta", ConfigRecord)
        weights = require_tensors(content, "arrays", finite=True)
        if isinstance(request, FedAvgRequest):
            check_state(weights, layout_of(request.weights), "model")
        num_examples = require_int(meta, "num-examples", minimum=1)
        train_loss = require_scalars(meta, "train-loss", 1)[0]
        return cls(weights, num_examples, train_loss, compute_seconds=compute_seconds(meta))


@dataclass
class FedAvgRequest(Payload):
    """``train.fedavg``: train the whole model ``weights`` for ``local_steps`` SGD steps at ``lr``."""

    weights: dict[str, torch.Tensor]
    local_steps: int
    lr: float

    message_type: ClassVar[str] = "train.fedavg"
    reply_type: ClassVar[type[Payload] | None] = FedAvgReply
    categories: ClassVar[Mapping[str, str]] = {"arrays": "model_down", "fedavg": "other"}

    def to_record(self) -> RecordDict:
        train = ConfigRecord({"local-steps": self.local_steps, "lr": self.lr})
        return RecordDict({"arrays": tensors_to_record(self.weights), "fedavg": train})

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> FedAvgRequest:
        train = require_record(content, "fedavg", ConfigRecord)
        return cls(
            require_tensors(content, "arrays", finite=True),
            require_int(train, "local-steps", minimum=1),
            require_number(train, "lr", minimum=0.0),
        )
