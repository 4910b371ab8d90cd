"""MU-SplitFed's messages: ``train.mu_smash`` (the round's ``θ_c`` down with the first step, the step's
direction seeds and ``μ``; ``z`` at ``θ_c`` and ``z±_p`` at ``θ_c ± μ v_p`` up) and ``train.mu_step``
(the node's scalars ``(ℓ₊ − ℓ₋)/2μ`` down; after the last step the node's ``θ_c`` up).
docs/protocols.md, "MU-SplitFed"."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from flwr.app import ConfigRecord, RecordDict

from ...records import tensors_to_record
from ..messages import (
    MAX_SEED,
    ModelSpec,
    Payload,
    Reply,
    ReplyError,
    SmashedBatch,
    check_state,
    compute_seconds,
    require_int,
    require_int_list,
    require_number,
    require_record,
    require_scalars,
    require_tensors,
    require_value,
)

PLUS, MINUS = "z+", "z-"
"""``smashed`` holds ``z`` at ``θ_c + μ v_p`` and at ``θ_c − μ v_p`` under ``z+<p>`` and ``z-<p>``, next to ``z``."""


def perturbed_names(count: int) -> tuple[str, ...]:
    """The keys of ``z±_p`` for ``p < count``."""
    return tuple(f"{sign}{p}" for p in range(count) for sign in (PLUS, MINUS))


@dataclass
class MUSmashReply(Reply):
    """``z`` (and companions) at ``θ_c``, ``z±_p`` at ``θ_c ± μ v_p``, and the labels of one step's minibatch."""

    batch: SmashedBatch
    plus: list[torch.Tensor]
    minus: list[torch.Tensor]

    categories: ClassVar[Mapping[str, str]] = {"smashed": "activations_up", "labels": "labels_up", "meta": "other"}
    lie_field: ClassVar[str | None] = "batch"
    attack_fields: ClassVar[tuple[str, ...]] = ("plus", "minus")

    @property
    def num_examples(self) -> int:
        """Examples in the smashed minibatch."""
        return self.batch.num_examples

    def to_record(self) -> RecordDict:
        perturbed = {f"{PLUS}{p}": t for p, t in enumerate(self.plus)} | {f"{MINUS}{p}": t for p, t in enumerate(self.minus)}
        smashed = SmashedBatch({**self.batch.smashed, **perturbed}, self.batch.labels)
        return RecordDict({**smashed.records(), "meta": self.meta(**{"num-examples": self.num_examples})})

    @classmethod
    def from_record(cls, content, request: MUSmashRequest | None = None, spec: ModelSpec | None = None) -> MUSmashReply:
        """A valid smashed batch with exactly ``z±_p`` for the request's ``P`` seeds, each of ``z``'s shape
        and dtype; ``num-examples`` agrees with the labels."""
        meta = require_record(content, "meta", ConfigRecord)
        record = require_tensors(content, "smashed")
        found = {k for k in record if k.startswith((PLUS, MINUS))}
        count = len(request.seeds) if request is not None else len(found) // 2
        names = perturbed_names(count)
        if found != set(names) or count == 0:
            raise ReplyError("wrong-count", f"expected exactly the perturbed activations {list(names)[:4]}")
        batch = SmashedBatch.read(content, spec, extra=names)
        z = batch.smashed["z"]
        plus = [batch.smashed.pop(f"{PLUS}{p}") for p in range(count)]
        minus = [batch.smashed.pop(f"{MINUS}{p}") for p in range(count)]
        if any(t.shape != z.shape or t.dtype != z.dtype for t in plus + minus):
            raise ReplyError("wrong-shape", "perturbed activations differ from z in shape or dtype")
        if require_int(meta, "num-examples", minimum=1) != batch.num_examples:
            raise ReplyError("wrong-count", "num-examples disagrees with the labels")
        return cls(batch, plus, minus, compute_seconds=compute_seconds(meta))


@dataclass
class MUSmashRequest(Payload):
    """``train.mu_smash``: smash step ``step``'s minibatch at ``θ_c`` and at ``θ_c ± μ v_p`` for each
    seed; the first step brings the round's ``θ_c``."""

    step: int
    seeds: tuple[int, ...]
    mu: float
    weights: dict[str, torch.Tensor] | None = None

    message_type: ClassVar[str] = "train.mu_smash"
    reply_type: ClassVar[type[Payload] | None] = MUSmashReply
    categories: ClassVar[Mapping[str, str]] = {"arrays": "model_down", "seeds": "seeds_and_ledger_down", "step": "other"}

    def to_record(self) -> RecordDict:
        records: dict[str, Any] = {
            "step": ConfigRecord({"step": self.step}),
            "seeds": ConfigRecord({"seeds": list(self.seeds), "mu": self.mu}),
        }
        if self.weights is not None:
            records["arrays"] = tensors_to_record(self.weights)
        return RecordDict(records)

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> MUSmashRequest:
        step = require_int(require_record(content, "step", ConfigRecord), "step")
        seeds = require_record(content, "seeds", ConfigRecord)
        values = tuple(require_int_list(seeds, "seeds", maximum=MAX_SEED))
        if not values:
            raise ReplyError("malformed", "no direction seeds")
        weights = require_tensors(content, "arrays", finite=True) if "arrays" in content else None
        return cls(step, values, require_number(seeds, "mu", positive=True), weights)


@dataclass
class MUStepReply(Reply):
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
    def from_record(cls, content, request: Payload | None = None, spec: ModelSpec | None = None) -> MUStepReply:
        """The reply to the last step must carry ``arrays``: a client segment of the model's layout."""
        meta = require_record(content, "meta", ConfigRecord)
        weights = None
        if "arrays" in content or (isinstance(request, MUStepRequest) and request.last):
            weights = require_tensors(content, "arrays", finite=True)
            if spec is not None:
                check_state(weights, spec.client_state, "client segment")
        return cls(weights, compute_seconds=compute_seconds(meta))


@dataclass
class MUStepRequest(Payload):
    """``train.mu_step``: the node's scalars ``g_p = (ℓ₊ − ℓ₋)/2μ`` for step ``step``; the node takes
    ``θ_c ← θ_c − lr/P Σ_p g_p v_p``."""

    step: int
    seeds: tuple[int, ...]
    scalars: tuple[float, ...]
    lr: float
    last: bool

    message_type: ClassVar[str] = "train.mu_step"
    reply_type: ClassVar[type[Payload] | None] = MUStepReply
    categories: ClassVar[Mapping[str, str]] = {"scalars": "scalars_down", "step": "other"}

    def to_record(self) -> RecordDict:
        return RecordDict(
            {
                "scalars": ConfigRecord({"scalars": [float(g) for g in self.scalars]}),
                "step": ConfigRecord({"step": self.step, "seeds": list(self.seeds), "lr": self.lr, "last": self.last}),
            }
        )

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> MUStepRequest:
        step = require_record(content, "step", ConfigRecord)
        seeds = tuple(require_int_list(step, "seeds", maximum=MAX_SEED))
        if not seeds:
            raise ReplyError("malformed", "no direction seeds")
        scalars = tuple(require_scalars(require_record(content, "scalars", ConfigRecord), "scalars", len(seeds)))
        return cls(
            require_int(step, "step"),
            seeds,
            scalars,
            require_number(step, "lr", minimum=0.0),
            bool(require_value(step, "last", bool)),
        )
