"""HERON-SFL's messages: ``train.heron`` (``θ_c``, ``θ_a`` and the local-training settings down;
the trained ``θ_c`` and ``θ_a``, the uploaded smashed batches and their steps up).
docs/protocols.md, "HERON-SFL"."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from flwr.app import ConfigRecord, RecordDict

from ...models.aux_head import AUX_HEADS
from ...records import tensors_to_record
from ..messages import (
    ModelSpec,
    Payload,
    Reply,
    ReplyError,
    SmashedBatch,
    check_state,
    compute_seconds,
    layout_of,
    require_int,
    require_int_list,
    require_number,
    require_record,
    require_str,
    require_tensors,
)


def upload_steps(local_steps: int, upload_every: int) -> list[int]:
    """The local steps (0-based) whose smashed batch is uploaded: every ``k``-th, i.e. ``k-1, 2k-1, ...``."""
    return [step for step in range(local_steps) if (step + 1) % upload_every == 0]


@dataclass
class HeronReply(Reply):
    """The trained ``θ_c`` and ``θ_a``, the node's number of examples, and the batches of the uploaded steps."""

    client_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor]
    num_examples: int
    steps: list[int] = field(default_factory=list)
    batches: list[SmashedBatch] = field(default_factory=list)

    categories: ClassVar[Mapping[str, str]] = {
        "arrays": "model_up",
        "aux-head": "model_up",
        "smashed": "activations_up",
        "labels": "labels_up",
        "meta": "other",
    }
    lie_field: ClassVar[str | None] = "batches"
    attack_fields: ClassVar[tuple[str, ...]] = ("client_state", "head_state")

    def to_record(self) -> RecordDict:
        records: dict[str, Any] = {
            "arrays": tensors_to_record(self.client_state),
            "aux-head": tensors_to_record(self.head_state),
            "meta": self.meta(steps=[int(s) for s in self.steps], **{"num-examples": int(self.num_examples)}),
        }
        for index, batch in enumerate(self.batches):
            records.update(batch.records(f".{index}"))
        return RecordDict(records)

    @classmethod
    def from_record(cls, content, request: HeronRequest | None = None, spec: ModelSpec | None = None) -> HeronReply:
        """Check the uploaded steps, both states (keys, shapes, finiteness) against what was sent, and every batch."""
        meta = require_record(content, "meta", ConfigRecord)
        steps = require_int_list(meta, "steps")
        if request is not None and steps != request.upload_steps:
            raise ReplyError("wrong-count", f"smashed batches from steps {steps}, expected {request.upload_steps}")
        client = require_tensors(content, "arrays")
        head = require_tensors(content, "aux-head")
        check_state(client, spec.client_state if spec is not None else layout_of(client), "client segment")
        check_state(head, layout_of(request.head_state if request is not None else head), "auxiliary head")
        batches = [SmashedBatch.read(content, spec, f".{index}") for index in range(len(steps))]
        num_examples = require_int(meta, "num-examples", minimum=1)
        return cls(client, head, num_examples, steps, batches, compute_seconds=compute_seconds(meta))


@dataclass
class HeronRequest(Payload):
    """``train.heron``: the global ``θ_c`` and ``θ_a``, and how to train on them locally."""

    client_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor]
    local_steps: int
    upload_every: int
    mu: float
    lr: float
    head: str = "linear"

    message_type: ClassVar[str] = "train.heron"
    reply_type: ClassVar[type[Payload] | None] = HeronReply
    categories: ClassVar[Mapping[str, str]] = {"arrays": "model_down", "aux-head": "model_down", "heron": "other"}

    @property
    def upload_steps(self) -> list[int]:
        """The local steps whose smashed batch the reply must carry."""
        return upload_steps(self.local_steps, self.upload_every)

    def to_record(self) -> RecordDict:
        settings = ConfigRecord(
            {"local-steps": self.local_steps, "upload-every": self.upload_every, "mu": self.mu, "lr": self.lr, "head": self.head}
        )
        return RecordDict(
            {"arrays": tensors_to_record(self.client_state), "aux-head": tensors_to_record(self.head_state), "heron": settings}
        )

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> HeronRequest:
        settings = require_record(content, "heron", ConfigRecord)
        steps = require_int(settings, "local-steps", minimum=1)
        every = require_int(settings, "upload-every", minimum=1, maximum=steps)
        return cls(
            require_tensors(content, "arrays", finite=True),
            require_tensors(content, "aux-head", finite=True),
            steps,
            every,
            require_number(settings, "mu", positive=True),
            require_number(settings, "lr", minimum=0.0),
            require_str(settings, "head", AUX_HEADS),
        )
