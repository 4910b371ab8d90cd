"""ZO-SFL's server part (docs/protocols.md, "ZO-SFL"): both segments take two-point zeroth-order
steps along directions shared over their concatenation; the client's step travels through the ledger
exactly as in HO-SFL.

Round ``t``: ``train.zo_smash`` to the sampled nodes (each catches up first) brings ``z`` and ``z̃_p``;
the server compares the losses at ``(θ_c, θ_s)`` and ``(θ_c + μ u_p, θ_s + μ u_p)``, steps ``θ_s``, and
the differences ``v̄_p`` become the round's ledger entry, which updates the server's ``θ_c``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ...zo import LedgerEntry, cap_entry, fingerprint, stream_length
from ..base import Link, NodeInfo, RunSettings
from ..hosfl.config import HOSFLSettings
from ..hosfl.server import HOSFLServer
from .config import ZOSFLSettings
from .messages import ZOSmashReply, ZOSmashRequest


class ZOSFLServer(HOSFLServer):
    """Pure zeroth-order split learning: HO-SFL's ledger, node versions, final sync and checkpoints,
    with the server's zeroth-order step (``split_server.zo_step``) in place of the probe exchange."""

    name = "zo-sfl"
    settings: ZOSFLSettings

    @classmethod
    def planned_cost(cls, settings: HOSFLSettings, run: RunSettings) -> tuple[int, int]:
        """One minibatch per client; one zeroth-order server step (none with no directions)."""
        return 1, 1 if settings.num_perturbations > 0 else 0

    def zo_smash(self, nodes: Sequence[NodeInfo], link: Link, seeds: tuple[int, ...]) -> dict[NodeInfo, ZOSmashReply]:
        """``train.zo_smash`` to ``nodes``: the replies of nodes at the server's version, with the rows it expects."""
        expected = fingerprint(self.model.client_parameters())
        requests = [(node, ZOSmashRequest(self.sync.catch_up(node), seeds, self.settings.mu)) for node in nodes]
        return link.exchange(requests, check=lambda node, reply: self.check_smash(node, reply, expected))

    def run_round(self, server_round: int, nodes: Sequence[NodeInfo], link: Link) -> dict[str, Any]:
        """``train.zo_smash`` → the server's two-point differences → both segments step (ledger entry)."""
        s = self.settings
        seeds = self.schedule.seeds(s.num_perturbations)
        smashed = self.zo_smash(nodes, link, seeds)
        metrics: dict[str, Any] = {"sampled": len(nodes), "smash-replies": len(smashed), "server-steps": 0}
        metrics["samples"] = sum(reply.num_examples for reply in smashed.values())
        if not self.enough(smashed, "smash", metrics) or not seeds:
            return metrics
        anchors, differences, seconds = self.split_server.zo_differences(
            [(reply.batch.smashed, reply.batch.labels) for reply in smashed.values()],
            [reply.perturbed for reply in smashed.values()],
            seeds,
            s.mu,
            stream_length(self.model.client_parameters()),
        )
        link.account.server_seconds += seconds
        per_node = dict(zip(smashed, zip(anchors, differences)))
        sizes = {node: _size(anchor, diffs) for node, (anchor, diffs) in per_node.items()}
        rejected = self.screen(link, sizes, "loss differences")
        kept = {node: values for node, values in per_node.items() if node not in rejected}
        metrics["smash-replies"] = len(kept)
        if not self.enough(kept, "smash", metrics):
            return metrics
        weights = self.weights(server_round, [self.expected_rows(node) for node in kept])
        scalars = self.combine(list(kept.values()), weights)
        entry = cap_entry(
            LedgerEntry(server_round, seeds, scalars, s.lr, s.mu), self.model.client_parameters(), 0.0, s.max_update_norm
        )
        self.split_server.zo_apply(seeds, entry.scalars, s.lr, s.mu, stream_length(self.model.client_parameters()))
        self.sync.append(entry)
        loss = sum(w * anchor for w, (anchor, _) in zip(weights, kept.values()))
        metrics.update({"train-loss": loss, "server-steps": 1})
        return metrics

    def combine(self, per_node: Sequence[tuple[float, Sequence[float]]], weights: Sequence[float]) -> tuple[float, ...]:
        """``v̄_p``: ``Σ_n w_n (L1 − L0)`` with ``mean``; a robust rule's combination of the per-node
        differences, scaled to the round's total weight, otherwise."""
        differences = [diffs for _, diffs in per_node]
        if self.aggregator.rule == "mean":
            return tuple(sum(w * d[p] for w, d in zip(weights, differences)) for p in range(len(differences[0])))
        return tuple(sum(weights) * v for v in self.aggregator.scalars(differences, weights))


def _size(anchor: float, differences: Sequence[float]) -> float:
    """A node's size for the reply bound: the root mean square of its loss differences (non-finite if any value is)."""
    if not math.isfinite(anchor) or not all(math.isfinite(d) for d in differences):
        return math.inf
    return math.sqrt(sum(d * d for d in differences) / len(differences)) if differences else 0.0
