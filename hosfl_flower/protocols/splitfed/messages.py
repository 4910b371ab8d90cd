"""SplitFed's messages: ``train.splitfed_smash`` (the round's ``θ_c`` down with the first step; ``z``,
``y`` up) and ``train.splitfed_grad`` (``λ`` down; after the last step the node's ``θ_c`` up).
docs/protocols.md, "SplitFed"."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from flwr.app import ConfigRecord, RecordDict

from ...records import tensors_to_record
from ..messages import (
    ModelSpec,
    Payload,
    Reply,
    ReplyError,
    SmashedBatch,
    activation_grad_record,
    check_state,
    compute_seconds,
    read_activation_grad,
    require_int,
    require_number,
    require_record,
    require_tensors,
    require_value,
)


@dataclass
class SplitFedSmashReply(Reply):
    """``z = f_c(x)`` (and companions) and the labels of one step's minibatch."""

    batch: SmashedBatch

    categories: ClassVar[Mapping[str, str]] = {"smashed": "activations_up", "labels": "labels_up", "meta": "other"}
    lie_field: ClassVar[str | None] = "batch"

    @property
    def num_examples(self) -> int:
        """Examples in the smashed minibatch."""
        return self.batch.num_examples

    def to_record(self) -> RecordDict:
        return RecordDict({**self.batch.records(), "meta": self.meta(**{"num-examples": self.num_examples})})

    @classmethod
    def from_record(cls, content, request=None, spec: ModelSpec | None = None) -> SplitFedSmashReply:
        meta = require_record(content, "meta", ConfigRecord)
        batch = SmashedBatch.read(content, spec)
        if require_int(meta, "num-examples", minimum=1) != batch.num_examples:
            raise ReplyError("wrong-count", "num-examples disagrees with the labels")
        return cls(batch, compute_seconds=compute_seconds(meta))


@dataclass
class SplitFedSmashRequest(Payload):
    """``train.splitfed_smash``: smash step ``step``'s minibatch; the first step brings the round's ``θ_c``."""

    step: int = 0
    weights: dict[str, torch.Tensor] | None = None

    message_type: ClassVar[str] = "train.splitfed_smash"
    reply_type: ClassVar[type[Payload] | None] = SplitFedSmashReply
    categories: ClassVar[Mapping[str, str]] = {"arrays": "model_down", "step": "other"}

    def to_record(self) -> RecordDict:
        records: dict[str, Any] = {"step": ConfigRecord({"step": self.step})}
        if self.weights is not None:
            records["arrays"] = tensors_to_record(self.weights)
        return RecordDict(records)

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> SplitFedSmashRequest:
        step = require_int(require_record(content, "step", ConfigRecord), "step")
        return cls(step, require_tensors(content, "arrays", finite=True) if "arrays" in content else None)


@dataclass
class SplitFedGradReply(Reply):
    """After the round's last step: the node's trained ``θ_c`` (earlier steps reply with ``meta`` only)."""

    weights: dict[str, torch.Tensor] | None = None

    categories: ClassVar[Mapping[str, str]] = {"arrays": "model_up", "meta": "other"}
    attack_fields: ClassVar[tuple[str, ...]] = ("weights",)

    def to_record(self) -> RecordDict:
        records: dict[str, Any] = {"meta": self.meta()}
        if self.weights is not None:
            records["arrays"] = tensors_to_record(self.weights)
        return RecordDict(records)

    @classmethod
    def from_record(cls, content, request: Payload | None = None, spec: ModelSpec | None = None) -> SplitFedGradReply:
        """The reply to the last step must carry ``arrays``: a client segment of the model's layout."""
        meta = require_record(content, "meta", ConfigRecord)
        weights = None
        if "arrays" in content or (isinstance(request, SplitFedGradRequest) and request.last):
            weights = require_tensors(content, "arrays", finite=True)
            if spec is not None:
                check_state(weights, spec.client_state, "client segment")
        return cls(weights, compute_seconds=compute_seconds(meta))


@dataclass
class SplitFedGradRequest(Payload):
    """``train.splitfed_grad``: ``λ = ∂ℓ/∂z`` of step ``step``; the node backpropagates it and steps at ``lr``."""

    activation_grad: torch.Tensor
    step: int
    lr: float
    last: bool

    message_type: ClassVar[str] = "train.splitfed_grad"
    reply_type: ClassVar[type[Payload] | None] = SplitFedGradReply
    categories: ClassVar[Mapping[str, str]] = {"activation-grad": "activation_grads_down", "step": "other"}

    def to_record(self) -> RecordDict:
        step = ConfigRecord({"step": self.step, "lr": self.lr, "last": self.last})
        return RecordDict({"activation-grad": activation_grad_record(self.activation_grad), "step": step})

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> SplitFedGradRequest:
        step = require_record(content, "step", ConfigRecord)
        return cls(
            read_activation_grad(content),
            require_int(step, "step"),
            require_number(step, "lr", minimum=0.0),
            bool(require_value(step, "last", bool)),
        )
