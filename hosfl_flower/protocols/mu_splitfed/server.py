"""MU-SplitFed's server part, as the HO-SFL authors reimplemented it for their comparison
(docs/protocols.md, "MU-SplitFed"): zeroth-order on both sides, ``τ`` server steps per client step,
per-client server replicas, FedAvg-style mixing of both segments.

Round ``t``: every sampled node gets a server replica (a copy of ``θ_s``). For each step
``e = 0 .. E−1`` the server draws ``P`` seeds ``v_p`` (``mu-splitfed.num-perturbations``), shared by every node of
the step, and:

1. ``train.mu_smash`` (``θ_c`` with ``e = 0``): each node replies with ``z`` at ``θ_c`` and ``z±_p`` at
   ``θ_c ± μ v_p``.
2. Each node's replica takes ``τ`` zeroth-order steps on ``(z, y)``, each along ``P`` fresh seeded
   directions ``u_p``: ``θ_s ← θ_s − η_s/P Σ_p (ℓ(θ_s + μu_p) − ℓ(θ_s − μu_p))/2μ · u_p``; the updated
   replica then scores ``z±_p``: the node's scalars ``g_p = (ℓ(z₊_p) − ℓ(z₋_p))/2μ``.
3. ``train.mu_step`` sends each node its ``g_p``; the node takes ``θ_c ← θ_c − η_c/P Σ_p g_p v_p``;
   after the last step it replies with ``θ_c``.

Then ``θ_c ← θ_c + η_g (avg θ_c,n − θ_c)`` over the finished nodes (``aggregation.rule``) and
``θ_s ← θ_s + η_g (avg θ_s,n − θ_s)`` over their replicas (``aggregation.rule`` too), weighted by the nodes'
numbers of examples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...split_server import RaySplitServer, SplitServer
from ..aggregation import ReplyBound, state_bytes, state_distance
from ..base import Link, NodeInfo, ProtocolServer, RunSettings
from ..messages import ReplyError
from .config import MUSplitFedSettings
from .messages import MUSmashReply, MUSmashRequest, MUStepReply, MUStepRequest


def mix_states(base: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], rate: float) -> dict[str, torch.Tensor]:
    """``base + rate (target − base)`` for floating tensors (``rate = 1``: ``target`` itself); others from ``target``."""
    if rate == 1.0:
        return {k: v.clone() for k, v in target.items()}
    return {k: base[k] + rate * (v - base[k]) if v.is_floating_point() else v.clone() for k, v in target.items()}


def _size(scalars: Sequence[float]) -> float:
    """A node's size for the reply bound: the root mean square of its scalars (non-finite if any is)."""
    if not all(math.isfinite(g) for g in scalars):
        return math.inf
    return math.sqrt(sum(g * g for g in scalars) / len(scalars))


class MUSplitFedServer(ProtocolServer[MUSplitFedSettings]):
    """MU-SplitFed; the replicas of a round live in ``self._replicas`` by node id."""

    name = "mu-splitfed"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._replicas: dict[int, SplitServer | RaySplitServer] = {}
        self.scalar_bound = ReplyBound(self.run.reply_bound)
        """The bound of the scalars (their sizes are not comparable with the returned states')."""

    @classmethod
    def planned_cost(cls, settings: MUSplitFedSettings, run: RunSettings) -> tuple[int, int]:
        """``E`` minibatches per client; ``τ`` zeroth-order steps of each client's replica per step."""
        return settings.local_steps, run.clients_per_round * settings.local_steps * settings.server_steps

    def run_round(self, server_round: int, nodes: Sequence[NodeInfo], link: Link) -> dict[str, Any]:
        """``E`` steps of (smash, ``τ`` replica steps, scalars down), then the mixing of both segments."""
        s = self.settings
        metrics: dict[str, Any] = {"sampled": len(nodes), "finished": 0, "samples": 0, "server-steps": 0}
        losses: list[float] = []
        replicas: Sequence[SplitServer | RaySplitServer] = self.split_server.copies(len(nodes))
        self._replicas = {node.node_id: replica for node, replica in zip(nodes, replicas)}
        active: list[NodeInfo] = list(nodes)
        finished: dict[NodeInfo, MUStepReply] | None = None
        for step in range(s.local_steps):
            replies = self.train_step(server_round, step, active, link, metrics, losses)
            if replies is None or (step < s.local_steps - 1 and not self.enough(replies, "step", metrics)):
                break
            active = list(replies)
            if step == s.local_steps - 1:
                finished = self.bounded_states(link, replies)
        if losses:
            metrics["train-loss"] = sum(losses) / len(losses)
        if finished is None or not self.enough(finished, "final", metrics):
            self._replicas = {}
            metrics["server-steps"] = 0
            return metrics
        metrics["finished"] = len(finished)
        weights = self.weights(server_round, [node.num_examples for node in finished])
        start = self.model.client_state()
        average = self.aggregator.states([reply.weights for reply in finished.values() if reply.weights is not None], weights)
        self.model.load_client_state(mix_states(start, average, s.global_lr))
        states = [self._replicas[node.node_id].state() for node in finished]
        current = self.split_server.state()
        mixed = mix_states(current["weights"], self.combine_server_states(states, weights)["weights"], s.global_lr)
        self.split_server.load_state({"weights": mixed, "optimizer": current["optimizer"]})
        link.account.server_averaging += 2 * len(finished) * state_bytes(mixed)
        self._replicas = {}
        return metrics

    def train_step(
        self, server_round: int, step: int, nodes: Sequence[NodeInfo], link: Link, metrics: dict[str, Any], losses: list[float]
    ) -> dict[NodeInfo, MUStepReply] | None:
        """One step with ``nodes``: smash at ``θ_c`` and ``θ_c ± μv``, ``τ`` replica steps each, scalars down."""
        s = self.settings
        seeds = self.schedule.seeds(s.num_perturbations)
        weights = self.client_state() if step == 0 else None
        smashed = link.exchange([(node, MUSmashRequest(step, seeds, s.mu, weights)) for node in nodes], check=self.check_rows)
        if not self.enough(smashed, "smash", metrics):
            return None
        metrics["samples"] += sum(reply.num_examples for reply in smashed.values())
        scalars: dict[NodeInfo, tuple[float, ...]] = {}
        for node, reply in smashed.items():
            replica = self._replicas[node.node_id]
            for _ in range(s.server_steps):
                server_seeds = self.schedule.seeds(s.num_perturbations)
                _, seconds = replica.zo_central_step(reply.batch.smashed, reply.batch.labels, server_seeds, s.mu, s.server_lr)
                link.account.server_seconds += seconds
                metrics["server-steps"] += 1
            companions = {k: v for k, v in reply.batch.smashed.items() if k != "z"}
            activations = [reply.batch.smashed["z"], *reply.plus, *reply.minus]
            values, seconds = replica.losses([({**companions, "z": z}, reply.batch.labels) for z in activations])
            link.account.server_seconds += seconds
            losses.append(values[0])
            plus, minus = values[1 : 1 + len(seeds)], values[1 + len(seeds) :]
            scalars[node] = tuple((a - b) / (2.0 * s.mu) for a, b in zip(plus, minus))
        rejected = self.screen(link, {node: _size(g) for node, g in scalars.items()}, "scalars", self.scalar_bound)
        last = step == s.local_steps - 1
        requests = [
            (node, MUStepRequest(step, seeds, g, s.client_lr, last)) for node, g in scalars.items() if node not in rejected
        ]
        return link.exchange(requests) if requests else {}

    def check_rows(self, node: NodeInfo, reply: MUSmashReply) -> None:
        """A smashed minibatch must have the rows the server expects of the node."""
        if reply.num_examples != self.expected_rows(node):
            raise ReplyError("wrong-count", f"{reply.num_examples} rows, expected {self.expected_rows(node)}")

    def bounded_states(self, link: Link, replies: Mapping[NodeInfo, MUStepReply]) -> dict[NodeInfo, MUStepReply]:
        """The replies whose ``θ_c`` lies within ``aggregation.reply-bound`` (size: distance from the round's global ``θ_c``)."""
        start = self.model.client_state()
        sizes = {
            node: state_distance(reply.weights, start) if reply.weights is not None else math.inf
            for node, reply in replies.items()
        }
        rejected = self.screen(link, sizes, "client segment")
        return {node: reply for node, reply in replies.items() if node not in rejected}

    # ------------------------------------------------------------------ checkpoints: the scalars' reply bound
    def state(self) -> dict[str, Any]:
        return {"scalar-bound": [float(size) for size in self.scalar_bound.history]}

    def check_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or set(state) != {"scalar-bound"}:
            got = sorted(state, key=str) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"expected exactly ['scalar-bound'], got {got}")
        sizes = state["scalar-bound"]
        limit = self.scalar_bound.history.maxlen or 0
        if not isinstance(sizes, list) or len(sizes) > limit:
            raise ValueError(f"scalar-bound must be a list of at most {limit} sizes")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in sizes):
            raise ValueError("scalar-bound holds a size that is not a finite number >= 0")

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.scalar_bound.history.clear()
        self.scalar_bound.history.extend(float(size) for size in state["scalar-bound"])
