"""ZO-SFL (PROTOCOLS §3): both segments trained by two-point zeroth-order steps along shared directions.

One exchange per round: ``train.zo_smash`` carries the ledger catch-up and the round's seeds; the node
returns ``z`` at ``θ_c`` and ``z̃_p`` at ``θ_c + μ u_p``. The server compares the losses at
``(θ_c, θ_s)`` and ``(θ_c + μ u_p, θ_s + μ u_p)`` and both segments take the same SGD step; the client
update travels through the ledger exactly as in HO-SFL.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from ..accounting import RoundAccount
from ..zo import LedgerEntry, apply_entry, fingerprint
from .base import NodeInfo, ReplyError
from .hosfl import HOSFLStrategy, SmashedReply


class ZOSFLStrategy(HOSFLStrategy):
    """Pure zeroth-order split learning (the paper's ZO-SFL baseline)."""

    name = "zo-sfl"

    def configure_train(self, server_round, arrays, config, grid: Grid) -> list[Message]:
        """Sample nodes, draw seeds, and build ``train.zo_smash`` messages (catch-up + seeds)."""
        nodes = self.sample_nodes(server_round, list(self.nodes.values()))
        seeds = self.schedule.seeds(self.cfg["zo.num-perturbations"])
        self._round = {"nodes": nodes, "seeds": seeds, "fingerprint": fingerprint(self.model.client_parameters())}
        seeds_record = ConfigRecord({"seeds": list(seeds), "mu": self.cfg["zo.mu"]})
        return [
            self.message(node, "train.zo_smash", server_round, {**self.catch_up_records(node), "seeds": seeds_record})
            for node in nodes
        ]

    def validate_smash(self, reply: Message, node: NodeInfo) -> SmashedReply:
        """As HO-SFL, plus exactly ``P`` perturbed activations shaped like ``z``."""
        parsed = super().validate_smash(reply, node)
        count = len(self._round["seeds"])
        tildes = [parsed.smashed.pop(f"z~{p}", None) for p in range(count)]
        if any(t is None or t.shape != parsed.smashed["z"].shape for t in tildes):
            raise ReplyError("wrong-count", f"expected {count} perturbed activations shaped like z")
        if any(key.startswith("z~") for key in parsed.smashed):
            raise ReplyError("wrong-count", "more perturbed activations than seeds")
        parsed.perturbed = tildes
        return parsed

    def run_round(self, grid: Grid, server_round: int, account: RoundAccount) -> dict[str, Any]:
        """``train.zo_smash`` → server two-point differences → both segments step."""
        replies = self.exchange(grid, self.configure_train(server_round, None, None, grid), account)
        kept: list[SmashedReply] = self.collect(replies, self._round["nodes"], self.validate_smash)
        metrics: dict[str, Any] = {"sampled": len(self._round["nodes"]), "smash-replies": len(kept)}
        metrics.update({"samples": sum(r.num_examples for r in kept), "server-steps": 0})
        account.client_seconds += sum(r.client_seconds for r in kept)
        if not self.enough_replies(kept, "smash", metrics) or not self._round["seeds"]:
            return metrics
        weights = self.aggregation_weights(server_round, [r.num_examples for r in kept])
        loss, scalars, seconds = self.split_server.zo_step(
            [(r.smashed, r.labels) for r in kept],
            [r.perturbed for r in kept],
            weights,
            self._round["seeds"],
            self.cfg["zo.mu"],
            self.cfg["zo-sfl.lr"],
            len(self.model.client_parameters()),
        )
        account.server_seconds += seconds
        entry = LedgerEntry(server_round, self._round["seeds"], scalars, self.cfg["zo-sfl.lr"], self.cfg["zo.mu"])
        self.ledger.append(entry)
        apply_entry(self.model.client_parameters(), self.client_optimizer, entry)
        metrics["train-loss"] = loss
        metrics["server-steps"] = 1
        return metrics

