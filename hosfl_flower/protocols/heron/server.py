"""HERON-SFL's server part (docs/protocols.md, "HERON-SFL"): one exchange per round, no server feedback.

Round ``t``: ``train.heron`` carries ``θ_c`` and the auxiliary head ``θ_a`` to the sampled nodes; each
takes ``h`` zeroth-order steps on its own auxiliary loss and uploads the smashed batch of every
``k``-th step. The server then trains ``θ_s`` first-order on those batches, node by node (SplitFed-V2
order), and averages ``θ_c`` and ``θ_a`` weighted by the nodes' numbers of examples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...checkpoint import check_tensors
from ...models.aux_head import build_aux_head
from ..aggregation import state_distance
from ..base import Link, NodeInfo, ProtocolServer, RunSettings
from ..messages import ReplyError
from .config import HeronSettings
from .messages import HeronReply, HeronRequest, upload_steps


class HeronServer(ProtocolServer[HeronSettings]):
    """HERON-SFL; ``self.aux_head`` is the global auxiliary head ``θ_a`` (built from ``spec.z_example``)."""

    name = "heron-sfl"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.aux_head = build_aux_head(self.settings.head, self.spec.z_example, self.spec.num_classes, self.run.seed)

    @classmethod
    def planned_cost(cls, settings: HeronSettings, run: RunSettings) -> tuple[int, int]:
        """``h`` local minibatches per client; one server step per uploaded batch of every sampled client."""
        return settings.local_steps, run.clients_per_round * len(upload_steps(settings.local_steps, settings.upload_every))

    def head_state(self) -> dict[str, torch.Tensor]:
        """A copy of the global ``θ_a``."""
        return {k: v.detach().clone() for k, v in self.aux_head.state_dict().items()}

    def run_round(self, server_round: int, nodes: Sequence[NodeInfo], link: Link) -> dict[str, Any]:
        """``train.heron`` → server steps on the uploaded batches → weighted average of ``θ_c`` and ``θ_a``."""
        s = self.settings
        request = HeronRequest(self.client_state(), self.head_state(), s.local_steps, s.upload_every, s.mu, s.lr, s.head)
        replies: dict[NodeInfo, HeronReply] = link.exchange([(node, request) for node in nodes], check=self.check_rows)
        replies = self.bounded(link, replies, request)
        metrics: dict[str, Any] = {"sampled": len(nodes), "replies": len(replies), "server-batches": 0, "server-steps": 0}
        metrics["samples"] = sum(s.local_steps * min(self.run.batch_size, node.num_examples) for node in replies)
        if not self.enough(replies, "heron", metrics):
            return metrics
        losses = []
        for reply in replies.values():
            for batch in reply.batches:
                step = self.split_server.step([(batch.smashed, batch.labels)], [1.0])
                link.account.server_seconds += step.seconds
                losses.append(step.loss)
        weights = self.weights(server_round, [node.num_examples for node in replies])
        self.model.load_client_state(self.aggregator.states([r.client_state for r in replies.values()], weights))
        self.aux_head.load_state_dict(self.aggregator.states([r.head_state for r in replies.values()], weights))
        metrics.update({"server-batches": len(losses), "server-steps": len(losses)})
        if losses:
            metrics["train-loss"] = sum(losses) / len(losses)
        return metrics

    def check_rows(self, node: NodeInfo, reply: HeronReply) -> None:
        """Every uploaded minibatch must have the rows the server expects of the node."""
        rows = sorted({batch.num_examples for batch in reply.batches})
        if rows and rows != [self.expected_rows(node)]:
            raise ReplyError("wrong-count", f"{rows} rows, expected {self.expected_rows(node)}")

    def bounded(self, link: Link, replies: Mapping[NodeInfo, HeronReply], request: HeronRequest) -> dict[NodeInfo, HeronReply]:
        """The replies within ``aggregation.reply-bound``; a reply's size is the distance of its
        ``(θ_c, θ_a)`` from the global ones sent."""
        sizes = {
            node: math.hypot(
                state_distance(r.client_state, request.client_state), state_distance(r.head_state, request.head_state)
            )
            for node, r in replies.items()
        }
        rejected = self.screen(link, sizes, "client segment and head")
        return {node: reply for node, reply in replies.items() if node not in rejected}

    # ------------------------------------------------------------------ checkpoints: the auxiliary head
    def state(self) -> dict[str, Any]:
        return {"aux-head": self.head_state()}

    def check_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or set(state) != {"aux-head"}:
            got = sorted(state, key=str) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"expected exactly ['aux-head'], got {got}")
        check_tensors("auxiliary head", state["aux-head"], self.aux_head.state_dict())

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.aux_head.load_state_dict(state["aux-head"])
