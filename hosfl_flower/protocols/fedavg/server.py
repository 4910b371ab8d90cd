"""FedAvg's server part: the unsplit model trained by the nodes and averaged each round
(docs/protocols.md, "FedAvg").

Round ``t``: ``train.fedavg`` to the sampled nodes (the whole model down; each trains it for
``fedavg.local-steps`` first-order steps), then the returned models are averaged by
:meth:`~hosfl_flower.protocols.base.ProtocolServer.weights`. The split server takes no step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..aggregation import state_distance
from ..base import Link, NodeInfo, ProtocolServer, RunSettings
from .config import FedAvgSettings
from .messages import FedAvgRequest


class FedAvgServer(ProtocolServer[FedAvgSettings]):
    """FedAvg of the whole model (both segments)."""

    name = "fedavg"

    @classmethod
    def planned_cost(cls, settings: FedAvgSettings, run: RunSettings) -> tuple[int, int]:
        """``fedavg.local-steps`` minibatches per client; the split server takes no step."""
        return settings.local_steps, 0

    def run_round(self, server_round: int, nodes: Sequence[NodeInfo], link: Link) -> dict[str, Any]:
        """``train.fedavg`` to ``nodes``, then the weighted average of the returned models."""
        steps, lr = self.settings.local_steps, self.settings.lr
        model = {key: value.detach().clone() for key, value in self.model.state_dict().items()}
        replies = link.exchange([(node, FedAvgRequest(model, steps, lr)) for node in nodes])
        sizes = {node: state_distance(reply.weights, model) for node, reply in replies.items()}
        rejected = self.screen(link, sizes, "model")
        replies = {node: reply for node, reply in replies.items() if node not in rejected}
        samples = sum(steps * min(self.run.batch_size, reply.num_examples) for reply in replies.values())
        metrics: dict[str, Any] = {"sampled": len(nodes), "replies": len(replies), "samples": samples, "server-steps": 0}
        if not self.enough(replies, "train", metrics):
            return metrics
        weights = self.weights(server_round, [node.num_examples for node in replies])
        self.model.load_state_dict(self.aggregator.states([reply.weights for reply in replies.values()], weights))
        self.share_server_weights()
        metrics["train-loss"] = sum(reply.train_loss for reply in replies.values()) / len(replies)
        return metrics

    def share_server_weights(self) -> None:
        """Give the averaged ``θ_s`` to a split server that holds its own copy (a device, a Ray actor)."""
        if getattr(self.split_server, "detached", False):
            self.split_server.load_state({**self.split_server.state(), "weights": self.model.server.state_dict()})
