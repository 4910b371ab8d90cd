"""What the auxiliary-network protocols share (HERON-SFL, CSE-FSL, FSL-SAGE): one exchange per round
that carries ``θ_c`` and the auxiliary model ``θ_a`` down, lets each node take ``h`` local steps with
no server feedback, and brings the trained state and the smashed batch of every ``k``-th step up; the
server steps ``θ_s`` on those batches node by node and averages ``θ_c`` (and ``θ_a``).

A protocol of the family subclasses :class:`LocalRoundRequest` (its message type and its own
settings), reuses :class:`LocalRoundReply`, and subclasses :class:`AuxiliaryServer` (the request it
sends, and what it does after the server steps). docs/protocols.md, "HERON-SFL", "CSE-FSL", "FSL-SAGE".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from flwr.app import ConfigRecord, RecordDict

from ..checkpoint import check_tensors
from ..models.aux_head import AUX_HEADS, build_aux_head
from ..records import tensors_to_record
from .aggregation import state_distance
from .base import Link, NodeInfo, ProtocolServer, RunSettings
from .messages import (
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
class LocalRoundReply(Reply):
    """The trained ``θ_c`` and ``θ_a``, the node's number of examples, and the batches of the uploaded
    steps. ``head_state`` is empty when the request's protocol does not train ``θ_a`` on the node
    (``returns_head`` false: FSL-SAGE); the record then has no ``aux-head``."""

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
            "meta": self.meta(steps=[int(s) for s in self.steps], **{"num-examples": int(self.num_examples)}),
        }
        if self.head_state:
            records["aux-head"] = tensors_to_record(self.head_state)
        for index, batch in enumerate(self.batches):
            records.update(batch.records(f".{index}"))
        return RecordDict(records)

    @classmethod
    def from_record(cls, content, request: LocalRoundRequest | None = None, spec: ModelSpec | None = None) -> LocalRoundReply:
        """Check the uploaded steps, both states (keys, shapes, finiteness) against what was sent, and every
        batch; ``aux-head`` must be there exactly when the request's protocol trains ``θ_a`` on the node."""
        meta = require_record(content, "meta", ConfigRecord)
        steps = require_int_list(meta, "steps")
        if request is not None and steps != request.upload_steps:
            raise ReplyError("wrong-count", f"smashed batches from steps {steps}, expected {request.upload_steps}")
        client = require_tensors(content, "arrays")
        check_state(client, spec.client_state if spec is not None else layout_of(client), "client segment")
        head: dict[str, torch.Tensor] = {}
        if request is None or request.returns_head:
            head = require_tensors(content, "aux-head")
            check_state(head, layout_of(request.head_state if request is not None else head), "auxiliary head")
        elif "aux-head" in content:
            raise ReplyError("malformed", "an auxiliary head the node does not train")
        batches = [SmashedBatch.read(content, spec, f".{index}") for index in range(len(steps))]
        num_examples = require_int(meta, "num-examples", minimum=1)
        return cls(client, head, num_examples, steps, batches, compute_seconds=compute_seconds(meta))


@dataclass
class LocalRoundRequest(Payload):
    """The global ``θ_c`` and ``θ_a``, and how to train on them locally (a protocol adds its own settings
    in :meth:`extra_settings` / :meth:`read_extra`, and names its settings record ``settings_record``)."""

    client_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor]
    local_steps: int
    upload_every: int
    lr: float
    head: str = "linear"

    settings_record: ClassVar[str] = ""
    returns_head: ClassVar[bool] = True
    """Whether the node trains ``θ_a`` and sends it back."""
    reply_type: ClassVar[type[Payload] | None] = LocalRoundReply

    @property
    def upload_steps(self) -> list[int]:
        """The local steps whose smashed batch the reply must carry."""
        return upload_steps(self.local_steps, self.upload_every)

    def extra_settings(self) -> dict[str, Any]:
        """The protocol's own values of the settings record."""
        return {}

    @classmethod
    def read_extra(cls, settings: ConfigRecord) -> dict[str, Any]:
        """The protocol's own fields, read (and checked) from the settings record."""
        return {}

    def to_record(self) -> RecordDict:
        values: dict[str, Any] = {
            "local-steps": self.local_steps,
            "upload-every": self.upload_every,
            "lr": self.lr,
            "head": self.head,
        }
        return RecordDict(
            {
                "arrays": tensors_to_record(self.client_state),
                "aux-head": tensors_to_record(self.head_state),
                self.settings_record: ConfigRecord({**values, **self.extra_settings()}),
            }
        )

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> LocalRoundRequest:
        settings = require_record(content, cls.settings_record, ConfigRecord)
        steps = require_int(settings, "local-steps", minimum=1)
        return cls(
            client_state=require_tensors(content, "arrays", finite=True),
            head_state=require_tensors(content, "aux-head", finite=True),
            local_steps=steps,
            upload_every=require_int(settings, "upload-every", minimum=1, maximum=steps),
            lr=require_number(settings, "lr", minimum=0.0),
            head=require_str(settings, "head", AUX_HEADS),
            **cls.read_extra(settings),
        )


class AuxiliaryServer(ProtocolServer):
    """The round of the auxiliary-network family; ``self.aux_head`` is the global ``θ_a`` (built from
    ``spec.z_example`` with ``settings.head``). Subclasses give :meth:`request` and may extend
    :meth:`after_server_steps`. The settings need ``local_steps``, ``upload_every`` and ``head``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.aux_head = build_aux_head(self.settings.head, self.spec.z_example, self.spec.num_classes, self.run.seed)

    @classmethod
    def planned_cost(cls, settings, run: RunSettings) -> tuple[int, int]:
        """``h`` local minibatches per client; one server step per uploaded batch of every sampled client."""
        return settings.local_steps, run.clients_per_round * len(upload_steps(settings.local_steps, settings.upload_every))

    def head_state(self) -> dict[str, torch.Tensor]:
        """A copy of the global ``θ_a``."""
        return {k: v.detach().clone() for k, v in self.aux_head.state_dict().items()}

    def request(self, server_round: int) -> LocalRoundRequest:
        """The round's request to every sampled node."""
        raise NotImplementedError

    def run_round(self, server_round: int, nodes: Sequence[NodeInfo], link: Link) -> dict[str, Any]:
        """The local round → server steps on the uploaded batches → :meth:`after_server_steps` →
        weighted average of ``θ_c`` and ``θ_a``."""
        request = self.request(server_round)
        replies: dict[NodeInfo, LocalRoundReply] = link.exchange([(node, request) for node in nodes], check=self.check_rows)
        replies = self.bounded(link, replies, request)
        metrics: dict[str, Any] = {"sampled": len(nodes), "replies": len(replies), "server-batches": 0, "server-steps": 0}
        metrics["samples"] = sum(request.local_steps * self.expected_rows(node) for node in replies)
        if not self.enough(replies, "local-round", metrics):
            return metrics
        losses = []
        for reply in replies.values():
            for batch in reply.batches:
                step = self.split_server.step([(batch.smashed, batch.labels)], [1.0])
                link.account.server_seconds += step.seconds
                losses.append(step.loss)
        weights = self.weights(server_round, [node.num_examples for node in replies])
        self.model.load_client_state(self.aggregator.states([r.client_state for r in replies.values()], weights))
        if request.returns_head:
            self.aux_head.load_state_dict(self.aggregator.states([r.head_state for r in replies.values()], weights))
        metrics.update({"server-batches": len(losses), "server-steps": len(losses)})
        if losses:
            metrics["train-loss"] = sum(losses) / len(losses)
        metrics.update(self.after_server_steps(server_round, replies, link))
        return metrics

    def after_server_steps(self, server_round: int, replies: Mapping[NodeInfo, LocalRoundReply], link: Link) -> dict[str, Any]:
        """Called after the round's averages with the kept replies; returns extra metrics (default: none)."""
        return {}

    def check_rows(self, node: NodeInfo, reply: LocalRoundReply) -> None:
        """Every uploaded minibatch must have the rows the server expects of the node."""
        rows = sorted({batch.num_examples for batch in reply.batches})
        if rows and rows != [self.expected_rows(node)]:
            raise ReplyError("wrong-count", f"{rows} rows, expected {self.expected_rows(node)}")

    def bounded(
        self, link: Link, replies: Mapping[NodeInfo, LocalRoundReply], request: LocalRoundRequest
    ) -> dict[NodeInfo, LocalRoundReply]:
        """The replies within ``aggregation.reply-bound``; a reply's size is the distance of its
        ``(θ_c, θ_a)`` (or ``θ_c`` alone) from the global ones sent."""
        sizes = {
            node: math.hypot(
                state_distance(r.client_state, request.client_state),
                state_distance(r.head_state, request.head_state) if request.returns_head else 0.0,
            )
            for node, r in replies.items()
        }
        rejected = self.screen(link, sizes, "client segment and head")
        return {node: reply for node, reply in replies.items() if node not in rejected}

    # ------------------------------------------------------------------ checkpoints: the auxiliary model
    def state(self) -> dict[str, Any]:
        return {"aux-head": self.head_state()}

    def check_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or set(state) != {"aux-head"}:
            got = sorted(state, key=str) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"expected exactly ['aux-head'], got {got}")
        check_tensors("auxiliary head", state["aux-head"], self.aux_head.state_dict())

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.aux_head.load_state_dict(state["aux-head"])


def received_head(request: LocalRoundRequest, z: torch.Tensor, num_classes: int):
    """The auxiliary head of ``request`` (its input size and token pooling follow the node's ``z``)."""
    head = build_aux_head(request.head, z, num_classes, seed=0)
    head.load_state_dict(request.head_state)
    return head
