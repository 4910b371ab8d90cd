"""ZO-SFL's server part (docs/protocols.md, "ZO-SFL"): both segments take two-point zeroth-order
steps along directions shared over their concatenation; the client's step travels through the ledger
exactly as in HO-SFL.

Round ``t``: ``train.zo_smash`` to the sampled nodes (each catches up first) brings ``z`` and ``z̃_p``;
the server compares the losses at ``(θ_c, θ_s)`` and ``(θ_c + μ u_p, θ_s + μ u_p)``, steps ``θ_s``, and
the differences ``v̄_p`` become the round's ledger entry, which updates the server's ``θ_c``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...zo import LedgerEntry, fingerprint
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
        """``train.zo_smash`` to ``nodes``: the replies of nodes at the server's version."""
        expected = fingerprint(self.model.client_parameters())
        requests = [(node, ZOSmashRequest(self.sync.catch_up(node), seeds, self.settings.mu)) for node in nodes]
        return link.exchange(requests, check=lambda node, reply: self.sync.check_version(node, reply, expected))

    def run_round(self, server_round: int, nodes: Sequence[NodeInfo], link: Link) -> dict[str, Any]:
        """``train.zo_smash`` → the server's two-point differences → both segments step (ledger entry)."""
        s = self.settings
        seeds = self.schedule.seeds(s.num_perturbations)
        smashed = self.zo_smash(nodes, link, seeds)
        metrics: dict[str, Any] = {"sampled": len(nodes), "smash-replies": len(smashed), "server-steps": 0}
        metrics["samples"] = sum(reply.num_examples for reply in smashed.values())
        if not self.enough(smashed, "smash", metrics) or not seeds:
            return metrics
        weights = self.weights(server_round, [reply.num_examples for reply in smashed.values()])
        loss, scalars, seconds = self.split_server.zo_step(
            [(reply.batch.smashed, reply.batch.labels) for reply in smashed.values()],
            [reply.perturbed for reply in smashed.values()],
            weights,
            seeds,
            s.mu,
            s.lr,
            len(self.model.client_parameters()),
        )
        link.account.server_seconds += seconds
        self.sync.append(LedgerEntry(server_round, seeds, scalars, s.lr, s.mu))
        metrics.update({"train-loss": loss, "server-steps": 1})
        return metrics
