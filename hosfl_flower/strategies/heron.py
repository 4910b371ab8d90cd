"""HERON-SFL (PROTOCOLS §2): zeroth-order clients with an auxiliary head, no server feedback.

One exchange per round: ``train.heron`` carries ``θ_c`` and the auxiliary head ``θ_a``; each node
takes ``h`` two-point zeroth-order steps on its own loss ``ℓ(h_a(f_c(x)), y)`` and keeps the
unperturbed ``(z, y)`` every ``k`` steps. The server then trains ``θ_s`` first-order on those batches,
client by client (SplitFed-V2 order), and averages ``θ_c`` and ``θ_a`` weighted by examples.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from ..accounting import RoundAccount
from ..checkpoint import check_tensors
from ..models.aux_head import build_aux_head
from ..records import record_to_tensors, tensors_to_record
from .aggregation import check_state, weighted_average
from .base import NodeInfo, ReplyError, SplitStrategy, error_text, meta_seconds


def upload_steps(local_steps: int, upload_every: int) -> list[int]:
    """The local steps (0-based) whose smashed batch is uploaded: every ``k``-th, i.e. ``k-1, 2k-1, ...``."""
    return [step for step in range(local_steps) if (step + 1) % upload_every == 0]


@dataclass
class HeronReply:
    """A validated HERON-SFL reply."""

    node: NodeInfo
    client: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]]
    num_examples: int
    client_seconds: float


class HeronSFLStrategy(SplitStrategy):
    """HERON-SFL as a Flower strategy; ``self.aux_head`` is the global auxiliary head ``θ_a``."""

    name = "heron-sfl"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            z = self.model.smash(self.test.take(torch.arange(1)).inputs)["z"]
        self.aux_head = build_aux_head(self.cfg["heron.head"], z, self.model.num_classes, self.cfg["seed"])
        self.expected_steps = upload_steps(self.cfg["heron.local-steps"], self.cfg["heron.upload-every"])

    def checkpoint_state(self) -> dict[str, Any]:
        """The base state plus the auxiliary head ``θ_a``."""
        return {**super().checkpoint_state(), "aux-head": {k: v.clone() for k, v in self.aux_head.state_dict().items()}}

    def checkpoint_state_keys(self) -> tuple[str, ...]:
        return (*super().checkpoint_state_keys(), "aux-head")

    def check_checkpoint_state(self, state) -> None:
        super().check_checkpoint_state(state)
        check_tensors("auxiliary head", state["aux-head"], self.aux_head.state_dict())

    def load_checkpoint_state(self, state) -> None:
        super().load_checkpoint_state(state)
        self.aux_head.load_state_dict(state["aux-head"])

    def configure_train(self, server_round: int, arrays, config, grid: Grid) -> list[Message]:
        """``train.heron`` to the sampled nodes: ``θ_c``, ``θ_a`` and the local-training settings."""
        nodes = self.sample_nodes(server_round, list(self.nodes.values()))
        self._round = {"nodes": nodes}
        records = {
            "arrays": tensors_to_record(self.model.client_state()),
            "aux-head": tensors_to_record(self.aux_head.state_dict()),
            "heron": ConfigRecord(
                {
                    "local-steps": self.cfg["heron.local-steps"],
                    "upload-every": self.cfg["heron.upload-every"],
                    "mu": self.cfg["zo.mu"],
                    "lr": self.cfg["heron.lr"],
                    "head": self.cfg["heron.head"],
                }
            ),
        }
        return [self.message(node, "train.heron", server_round, records) for node in nodes]

    def validate_reply(self, reply: Message, node: NodeInfo) -> HeronReply:
        """Check weights (keys, shapes, finiteness), the uploaded steps and every smashed batch."""
        if reply.has_error():
            raise ReplyError("error", error_text(reply))
        meta = reply.content.config_records.get("meta")
        if meta is None or "steps" not in meta or "num-examples" not in meta:
            raise ReplyError("malformed", "missing meta")
        steps = [int(s) for s in meta["steps"]] if isinstance(meta["steps"], list) else [int(meta["steps"])]
        if steps != self.expected_steps:
            raise ReplyError("wrong-count", f"smashed batches from steps {steps}, expected {self.expected_steps}")
        try:
            client = record_to_tensors(reply.content.array_records["arrays"])
            head = record_to_tensors(reply.content.array_records["aux-head"])
            check_state(client, self.model.client_state(), "client segment")
            check_state(head, self.aux_head.state_dict(), "auxiliary head")
        except KeyError as missing:
            raise ReplyError("malformed", f"missing {missing}") from None
        except ValueError as error:
            reason = "non-finite" if "not finite" in str(error) else "wrong-shape"
            raise ReplyError(reason, str(error)) from None
        batches = [self.parse_smashed(reply.content, f".{i}") for i in range(len(steps))]
        num_examples = int(meta["num-examples"])
        if num_examples <= 0:
            raise ReplyError("wrong-count", "num-examples must be positive")
        return HeronReply(node, client, head, batches, num_examples, meta_seconds(reply))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, then :meth:`aggregate_replies`."""
        kept: list[HeronReply] = self.collect(replies, self._round["nodes"], self.validate_reply)
        metrics = {"sampled": len(self._round["nodes"]), **self.aggregate_replies(server_round, kept)}
        return None, MetricRecord(metrics)

    def aggregate_replies(self, server_round: int, kept: list[HeronReply]) -> dict[str, Any]:
        """Server steps on the smashed batches client by client, then FedAvg of ``θ_c`` and ``θ_a``
        weighted by :meth:`aggregation_weights` (examples)."""
        metrics: dict[str, Any] = {"replies": len(kept), "server-batches": 0}
        metrics["samples"] = sum(self.cfg["heron.local-steps"] * min(self.cfg["batch-size"], r.num_examples) for r in kept)
        if not self.enough_replies(kept, "heron", metrics):
            return metrics
        losses, seconds = [], 0.0
        for reply in kept:
            for batch in reply.batches:
                result = self.split_server.step([batch], [1.0])
                losses.append(result.loss)
                seconds += result.seconds
        weights = self.aggregation_weights(server_round, [r.num_examples for r in kept])
        self.model.load_client_state(weighted_average([r.client for r in kept], weights))
        self.aux_head.load_state_dict(weighted_average([r.head for r in kept], weights))
        metrics.update(
            {
                "server-batches": len(losses),
                "train-loss": sum(losses) / len(losses) if losses else 0.0,
                "server-seconds": seconds,
                "client-seconds": sum(r.client_seconds for r in kept),
            }
        )
        return metrics

    def run_round(self, grid: Grid, server_round: int, account: RoundAccount) -> dict[str, Any]:
        """``train.heron`` → server steps on the uploaded batches → FedAvg."""
        replies = self.exchange(grid, self.configure_train(server_round, None, None, grid), account)
        _, metrics = self.aggregate_train(server_round, replies)
        row = dict(metrics)
        account.server_seconds += float(row.pop("server-seconds", 0.0))
        account.client_seconds += float(row.pop("client-seconds", 0.0))
        row["server-steps"] = row["server-batches"]
        return row
