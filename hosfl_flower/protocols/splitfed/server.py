"""SplitFed V1 and V2's server part (Thapa et al.): first-order split learning with FedAvg of the client
segments (docs/protocols.md, "SplitFed").

A round is ``splitfed.local-steps`` steps; a step is ``train.splitfed_smash`` (``z``, ``y`` up; the
first step brings the global ``θ_c`` down), a server step per node, and ``train.splitfed_grad`` (``λ``
down; the node backpropagates ``z.backward(λ)`` and steps). After the last step the nodes return their
client segments, which are averaged by :meth:`~hosfl_flower.protocols.base.ProtocolServer.weights`.
V2 steps one server model on the nodes in sequence; V1 steps one server copy per node (in parallel
when the copies are Ray actors) and averages the copies at the end of the round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...split_server import RaySplitServer, SplitServer, StepResult, step_each
from ..aggregation import state_bytes, state_distance
from ..base import Link, NodeInfo, ProtocolServer, RunSettings
from ..messages import ReplyError
from .config import SplitFedSettings
from .messages import SplitFedGradReply, SplitFedGradRequest, SplitFedSmashReply, SplitFedSmashRequest

Batch = tuple[Mapping[str, torch.Tensor], torch.Tensor]


class SplitFedV2Server(ProtocolServer[SplitFedSettings]):
    """SplitFed V2: the nodes in sequence on one server model. :meth:`begin_round`,
    :meth:`server_steps` and :meth:`end_round` are what V1 changes."""

    name = "splitfed-v2"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._snapshot: dict | None = None

    @classmethod
    def planned_cost(cls, settings: SplitFedSettings, run: RunSettings) -> tuple[int, int]:
        """``splitfed.local-steps`` minibatches per client; one server step per client per step (V1: on its copy)."""
        return settings.local_steps, run.clients_per_round * settings.local_steps

    # ------------------------------------------------------------------ what V1 changes
    def begin_round(self, nodes: Sequence[NodeInfo]) -> None:
        """Called before the first step of a round; V2 keeps ``θ_s`` as it was, in case the round is skipped."""
        self._snapshot = self.split_server.state()

    def server_steps(self, nodes: Sequence[NodeInfo], batches: Sequence[Batch]) -> list[StepResult]:
        """One server step per (node, batch); V2: in sequence on the one server model."""
        return [self.split_server.step([batch], [1.0]) for batch in batches]

    def end_round(self, finished: Sequence[NodeInfo], weights: Sequence[float], link: Link) -> None:
        """Called once per round after the client segments are averaged; with no nodes the round was
        skipped and ``θ_s`` goes back to its state at the start of the round."""
        if not finished and self._snapshot is not None:
            self.split_server.load_state(self._snapshot)
        self._snapshot = None

    # ------------------------------------------------------------------ the round
    def run_round(self, server_round: int, nodes: Sequence[NodeInfo], link: Link) -> dict[str, Any]:
        """``splitfed.local-steps`` steps, then the example-weighted average of the returned ``θ_c``."""
        metrics: dict[str, Any] = {"sampled": len(nodes), "finished": 0, "samples": 0}
        losses: list[float] = []
        self.begin_round(nodes)
        finished = self.train_steps(server_round, nodes, link, metrics, losses)
        if finished is not None:
            finished = self.bounded_states(link, finished, "client segment")
        if finished is not None and self.enough(finished, "final", metrics):
            weights = self.weights(server_round, [node.num_examples for node in finished])
            states = [reply.weights for reply in finished.values() if reply.weights is not None]
            self.model.load_client_state(self.aggregator.states(states, weights))
            self.end_round(list(finished), weights, link)
        else:
            self.end_round([], [], link)
        if losses:
            metrics["train-loss"] = sum(losses) / len(losses)
        metrics["server-steps"] = 0 if metrics.get("skipped") else len(losses)
        return metrics

    def check_rows(self, node: NodeInfo, reply: SplitFedSmashReply) -> None:
        """A smashed minibatch must have the rows the server expects of the node."""
        if reply.num_examples != self.expected_rows(node):
            raise ReplyError("wrong-count", f"{reply.num_examples} rows, expected {self.expected_rows(node)}")

    def bounded_states(
        self, link: Link, replies: Mapping[NodeInfo, SplitFedGradReply], what: str
    ) -> dict[NodeInfo, SplitFedGradReply]:
        """The replies whose ``θ_c`` lies within ``aggregation.reply-bound`` (size: distance from the round's global ``θ_c``)."""
        start = self.model.client_state()
        sizes = {
            node: state_distance(reply.weights, start) if reply.weights is not None else math.inf
            for node, reply in replies.items()
        }
        rejected = self.screen(link, sizes, what)
        return {node: reply for node, reply in replies.items() if node not in rejected}

    def train_steps(
        self, server_round: int, nodes: Sequence[NodeInfo], link: Link, metrics: dict[str, Any], losses: list[float]
    ) -> dict[NodeInfo, SplitFedGradReply] | None:
        """The round's steps: the last step's gradient replies, or ``None`` if an exchange had too few."""
        replies: dict[NodeInfo, SplitFedGradReply] | None = None
        active = list(nodes)
        for step in range(self.settings.local_steps):
            replies = self.train_step(server_round, step, active, link, metrics, losses)
            last = step == self.settings.local_steps - 1
            if replies is None or (not last and not self.enough(replies, "gradient", metrics)):
                return None
            active = list(replies)
        metrics["finished"] = len(active)
        return replies

    def train_step(
        self, server_round: int, step: int, nodes: Sequence[NodeInfo], link: Link, metrics: dict[str, Any], losses: list[float]
    ) -> dict[NodeInfo, SplitFedGradReply] | None:
        """One step with ``nodes``: smash, a server step per node, gradients down; ``None`` if too few smashed."""
        weights = self.client_state() if step == 0 else None
        smashed = link.exchange([(node, SplitFedSmashRequest(step, weights)) for node in nodes], check=self.check_rows)
        if not self.enough(smashed, "smash", metrics):
            return None
        results = self.server_steps(list(smashed), [(reply.batch.smashed, reply.batch.labels) for reply in smashed.values()])
        link.account.server_seconds += sum(result.seconds for result in results)
        losses.extend(result.loss for result in results)
        metrics["samples"] += sum(reply.num_examples for reply in smashed.values())
        last = step == self.settings.local_steps - 1
        requests = [
            (node, SplitFedGradRequest(result.activation_grads[0], step, self.settings.lr, last))
            for node, result in zip(smashed, results)
        ]
        return link.exchange(requests)


class SplitFedV1Server(SplitFedV2Server):
    """SplitFed V1: one server copy per node, stepped in parallel, averaged at the end of the round."""

    name = "splitfed-v1"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._copies: dict[int, SplitServer | RaySplitServer] = {}

    def begin_round(self, nodes: Sequence[NodeInfo]) -> None:
        """One server copy per node; ``θ_s`` itself changes only when the copies are averaged."""
        copies: Sequence[SplitServer | RaySplitServer] = self.split_server.copies(len(nodes))
        self._copies = {node.node_id: server for node, server in zip(nodes, copies)}

    def server_steps(self, nodes: Sequence[NodeInfo], batches: Sequence[Batch]) -> list[StepResult]:
        """Each node's batch on its own copy (in parallel when the copies are Ray actors)."""
        return step_each([self._copies[node.node_id] for node in nodes], batches)

    def end_round(self, finished: Sequence[NodeInfo], weights: Sequence[float], link: Link) -> None:
        """``θ_s`` becomes the finished nodes' copies combined (:meth:`combine_server_states`);
        the account's ``server_averaging`` counts each copy's ``θ_s`` up and the average down."""
        if finished:
            states = [self._copies[node.node_id].state() for node in finished]
            self.split_server.load_state(self.combine_server_states(states, weights))
            link.account.server_averaging += 2 * len(finished) * state_bytes(states[0]["weights"])
        self._copies = {}
