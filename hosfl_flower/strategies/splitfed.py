"""SplitFed V1 and V2 (Thapa et al.; PROTOCOLS §3): first-order split learning with FedAvg of the
client segments.

A round is ``splitfed.local-steps`` steps; a step is ``train.splitfed_smash`` (``z``, ``y`` up), a server step
per client, ``train.splitfed_grad`` (``λ`` down; the client backpropagates ``z.backward(λ)`` and steps).
After the last step the nodes return their client segments, which are averaged by examples.
V2 steps one server model on the clients in sequence; V1 steps one server copy per client (in
parallel when the copies are Ray actors) and averages the copies at the end of the round.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from ..accounting import RoundAccount
from ..records import record_to_tensors, tensors_to_record
from ..split_server import StepResult, average_states, step_each
from .aggregation import check_state, weighted_average
from .base import NodeInfo, ReplyError, SplitStrategy, error_text, meta_seconds


class SplitFedV2Strategy(SplitStrategy):
    """SplitFed V2: clients in sequence on one server model."""

    name = "splitfed-v2"

    def configure_train(self, server_round: int, arrays, config, grid: Grid) -> list[Message]:
        """Sample the round's nodes; their first ``train.splitfed_smash`` carries the global ``θ_c``."""
        nodes = self.sample_nodes(server_round, list(self.nodes.values()))
        self._round = {"nodes": nodes}
        weights = tensors_to_record(self.model.client_state())
        return [self._smash_message(node, server_round, 0, weights) for node in nodes]

    def _smash_message(self, node: NodeInfo, server_round: int, step: int, weights=None) -> Message:
        records: dict[str, Any] = {"step": ConfigRecord({"step": step})}
        if weights is not None:
            records["arrays"] = weights
        return self.message(node, "train.splitfed_smash", server_round, records)

    # ------------------------------------------------------------------ hooks for V1
    def begin_round(self, nodes: Sequence[NodeInfo]) -> None:
        """Called before the first step of a round; V2 keeps ``θ_s`` as it was, in case the round is skipped."""
        self._snapshot = self.split_server.state()

    def server_steps(self, nodes: Sequence[NodeInfo], batches) -> list[StepResult]:
        """One server step per (node, batch); V2: in sequence on the one server model."""
        return [self.split_server.step([batch], [1.0]) for batch in batches]

    def end_round(self, finished: Sequence[NodeInfo], weights: Sequence[float]) -> None:
        """Called after the client segments are averaged; with no nodes the round was skipped and
        ``θ_s`` goes back to its state at the start of the round."""
        if not finished:
            self.split_server.load_state(self._snapshot)
        self._snapshot = None

    # ------------------------------------------------------------------ the round
    def run_round(self, grid: Grid, server_round: int, account: RoundAccount) -> dict[str, Any]:
        steps = self.cfg["splitfed.local-steps"]
        messages = self.configure_train(server_round, None, None, grid)
        active = list(self._round["nodes"])
        self.begin_round(active)
        losses: list[float] = []
        metrics: dict[str, Any] = {"sampled": len(active), "finished": 0}
        samples = 0
        for step in range(steps):
            if step:
                messages = [self._smash_message(node, server_round, step) for node in active]
            replies = self.exchange(grid, messages, account)
            kept = self.collect(replies, active, self._validate_smash)
            if not self.enough_replies(kept, "smash", metrics):
                break
            results = self.server_steps([node for node, _, _, _ in kept], [(sm, y) for _, sm, y, _ in kept])
            account.server_seconds += sum(r.seconds for r in results)
            account.client_seconds += sum(seconds for _, _, _, seconds in kept)
            losses.extend(r.loss for r in results)
            samples += sum(int(labels.shape[0]) for _, _, labels, _ in kept)
            last = step == steps - 1
            grads = [
                self.message(
                    node,
                    "train.splitfed_grad",
                    server_round,
                    {
                        "activation-grad": tensors_to_record({"z": result.activation_grads[0]}),
                        "step": ConfigRecord({"step": step, "lr": self.cfg["splitfed.lr"], "last": last}),
                    },
                )
                for (node, _, _, _), result in zip(kept, results)
            ]
            replies = self.exchange(grid, grads, account)
            self._round["stepping"] = [node for node, _, _, _ in kept]
            if last:
                _, round_metrics = self.aggregate_train(server_round, replies)
                metrics.update(dict(round_metrics))
            else:
                active = self.collect(replies, self._round["stepping"], self._validate_grad)
                if not self.enough_replies(active, "gradient", metrics):
                    break
            account.client_seconds += sum(meta_seconds(r) for r in replies if not r.has_error())
        if metrics.get("skipped"):
            self.end_round([], [])
        if losses:
            metrics["train-loss"] = sum(losses) / len(losses)
        metrics.update({"samples": samples, "server-steps": 0 if metrics.get("skipped") else len(losses)})
        return metrics

    def _validate_grad(self, reply: Message, node: NodeInfo) -> NodeInfo:
        if reply.has_error():
            raise ReplyError("error", error_text(reply))
        return node

    def _validate_final(self, reply: Message, node: NodeInfo) -> tuple[NodeInfo, dict[str, torch.Tensor]]:
        self._validate_grad(reply, node)
        try:
            weights = record_to_tensors(reply.content.array_records["arrays"])
            check_state(weights, self.model.client_state(), "client segment")
        except KeyError as missing:
            raise ReplyError("malformed", f"missing {missing}") from None
        except ValueError as error:
            raise ReplyError("non-finite" if "not finite" in str(error) else "wrong-shape", str(error)) from None
        return node, weights

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the client segments returned after the last step (weighted by examples)."""
        finished = self.collect(replies, self._round["stepping"], self._validate_final)
        metrics: dict[str, Any] = {"finished": len(finished)}
        if not self.enough_replies(finished, "final", metrics):
            return None, MetricRecord(metrics)
        weights = self.aggregation_weights(server_round, [node.num_examples for node, _ in finished])
        self.model.load_client_state(weighted_average([state for _, state in finished], weights))
        self.end_round([node for node, _ in finished], weights)
        return None, MetricRecord(metrics)

    def _validate_smash(self, reply: Message, node: NodeInfo):
        if reply.has_error():
            raise ReplyError("error", error_text(reply))
        smashed, labels = self.parse_smashed(reply.content)
        return node, smashed, labels, meta_seconds(reply)


class SplitFedV1Strategy(SplitFedV2Strategy):
    """SplitFed V1: one server copy per client, stepped in parallel, averaged at the end of the round."""

    name = "splitfed-v1"

    def begin_round(self, nodes: Sequence[NodeInfo]) -> None:
        """One server copy per node; ``θ_s`` itself changes only when the copies are averaged."""
        copies = self.split_server.copies(len(nodes))
        self._copies = {node.node_id: server for node, server in zip(nodes, copies)}

    def server_steps(self, nodes: Sequence[NodeInfo], batches) -> list[StepResult]:
        return step_each([self._copies[node.node_id] for node in nodes], batches)

    def end_round(self, finished: Sequence[NodeInfo], weights: Sequence[float]) -> None:
        if finished:
            states = [self._copies[node.node_id].state() for node in finished]
            self.split_server.load_state(average_states(states, weights))
        self._copies = {}
