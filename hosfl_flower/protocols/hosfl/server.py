"""HO-SFL's server part: one first-order server step per round, the clients' ``P`` scalars
aggregated into a ledger entry (docs/protocols.md, "HO-SFL").

Round ``t``: ``train.smash`` to the sampled nodes (each catches up first), one server step on their
``z`` giving ``λ_n`` (held back until the probes arrive), ``train.probe`` (``λ_n`` and the round's
seeds), then ``v̄`` becomes the round's ledger entry and updates the server's ``θ_c``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ...options import ConfigError
from ...zo import aggregate_scalars, check_jvp, fingerprint, make_client_optimizer
from ..base import Link, NodeInfo, ProtocolServer
from ..messages import ReplyError
from .config import HOSFLSettings
from .messages import ProbeReply, ProbeRequest, SmashReply, SmashRequest
from .sync import LedgerSync


class HOSFLServer(ProtocolServer[HOSFLSettings]):
    """HO-SFL. ``self.sync`` holds the ledger, the server's client optimizer and each node's round."""

    name = "hosfl"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sync = LedgerSync(self.model.client_parameters(), self.model.client_state, self._client_optimizer())
        self.update_rule = self.settings.update_rule(self.run.num_rounds)
        self.partitions: dict[int, int] = {}
        self.check_setup(self.model, self.spec, self.settings)

    @property
    def ledger(self):
        return self.sync.ledger

    def _client_optimizer(self):
        return make_client_optimizer(self.settings.client_optimizer, self.settings.client_weight_decay)

    @classmethod
    def check_setup(cls, model, spec, settings) -> None:
        """``zo.estimator='jvp'`` needs a forward-mode derivative of every operation of ``f_c``: one
        probe on one held-out example checks it (the model is left untouched)."""
        if settings.estimator != "jvp" or not settings.num_perturbations:
            return
        inputs = dict(spec.example_inputs)
        try:
            check_jvp(lambda: model.smash(inputs)["z"], model.client)
        except ValueError as error:
            raise ConfigError("zo.estimator", "jvp", f"cannot be used with this model: {error}") from None

    def node_discovered(self, node: NodeInfo, applied_round: int) -> None:
        self.partitions[node.node_id] = node.partition_id
        self.sync.node_discovered(node, applied_round)

    def smash(self, nodes: Sequence[NodeInfo], link: Link) -> dict[NodeInfo, SmashReply]:
        """``train.smash`` to ``nodes``: the replies of nodes at the server's version."""
        expected = fingerprint(self.model.client_parameters())
        requests = [(node, SmashRequest(self.sync.catch_up(node))) for node in nodes]
        return link.exchange(requests, check=lambda node, reply: self.check_smash(node, reply, expected))

    def check_smash(self, node: NodeInfo, reply: SmashReply, expected: str) -> None:
        """A smash reply must come from a node at the server's version, with the rows the server expects."""
        if reply.num_examples != self.expected_rows(node):
            raise ReplyError("wrong-count", f"{reply.num_examples} rows, expected {self.expected_rows(node)}")
        self.sync.check_version(node, reply, expected)

    def bounded(
        self, link: Link, probes: Mapping[NodeInfo, ProbeReply], requests: Mapping[NodeInfo, ProbeRequest]
    ) -> dict[NodeInfo, ProbeReply]:
        """The probe replies within ``aggregation.reply-bound``: a reply's size is ``rms(v_n) / ‖λ_n‖``
        (both carry the node's weight, so the ratio does not), compared with the run's median."""
        sizes = {
            node: _rms(reply.scalars) / max(float(requests[node].activation_grad.norm()), 1e-30) for node, reply in probes.items()
        }
        rejected = self.screen(link, sizes, "probe rms(v)/|λ|")
        return {node: reply for node, reply in probes.items() if node not in rejected}

    def combine_probes(self, probes: Mapping[NodeInfo, ProbeReply], weight_of: Mapping[NodeInfo, float]) -> tuple[float, ...]:
        """``v̄`` of the kept probe replies. Each ``v_n`` carries its node's weight through ``λ_n``:
        ``mean`` sums them (rescaled when replies were dropped); a robust rule combines the per-node
        estimates ``v_n / w_n`` and scales back to the round's total weight."""
        total = sum(weight_of.values())
        if self.aggregator.rule == "mean":
            return aggregate_scalars([r.scalars for r in probes.values()], sum(weight_of[n] for n in probes), total)
        positive = [n for n in probes if weight_of[n] > 0]
        estimates = [[v / weight_of[n] for v in probes[n].scalars] for n in positive]
        combined = self.aggregator.scalars(estimates, [weight_of[n] for n in positive])
        return tuple(total * v for v in combined)

    def run_round(self, server_round: int, nodes: Sequence[NodeInfo], link: Link) -> dict[str, Any]:
        """``train.smash`` → server step (held back) → ``train.probe`` → ledger entry."""
        seeds = self.schedule.seeds(self.settings.num_perturbations)
        smashed = self.smash(nodes, link)
        metrics: dict[str, Any] = {"sampled": len(nodes), "smash-replies": len(smashed), "server-steps": 0}
        metrics["samples"] = sum(reply.num_examples for reply in smashed.values())
        if not self.enough(smashed, "smash", metrics):
            return metrics
        kept = list(smashed)
        weights = self.weights(server_round, [self.expected_rows(node) for node in kept])
        batches = [(reply.batch.smashed, reply.batch.labels) for reply in smashed.values()]
        step = self.split_server.step(batches, weights, apply=not seeds)
        link.account.server_seconds += step.seconds
        metrics["train-loss"] = step.loss
        if seeds:
            s = self.settings
            requests = {
                node: ProbeRequest(lam, tuple(seeds), s.mu, s.estimator, s.directions)
                for node, lam in zip(kept, step.activation_grads)
            }
            probes = self.bounded(link, link.exchange(list(requests.items())), requests)
            metrics["probe-replies"] = len(probes)
            if not self.enough(probes, "probe", metrics) or not any(w > 0 for n, w in zip(kept, weights) if n in probes):
                metrics["skipped"] = 1
                self.split_server.discard_pending()
                return metrics
            self.split_server.apply_pending()
            scalars = self.combine_probes(probes, dict(zip(kept, weights)))
            self.sync.append(self.update_rule.entry(server_round, seeds, scalars, self.model.client_parameters()))
        metrics["server-steps"] = 1
        return metrics

    def finish(self, nodes: Sequence[NodeInfo], link: Link) -> dict[str, Any]:
        """With ``final-sync``: bring every node up to date and check its fingerprint."""
        return self.sync.final_sync(nodes, link) if self.settings.final_sync else {}

    def state(self) -> dict[str, Any]:
        return self.sync.state(self.partitions)

    def check_state(self, state: Mapping[str, Any]) -> None:
        """The ledger, the client optimizer's state and the node versions (:meth:`LedgerSync.check_state`)."""
        self.sync.check_state(state, self._client_optimizer())

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.sync.load(state, self._client_optimizer())


class FrozenClientServer(HOSFLServer):
    """Ablation: HO-SFL with ``P = 0``. The server trains; the client segment keeps its initial weights."""

    name = "frozen-client"


def _rms(values) -> float:
    """Root mean square of a reply's scalars."""
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else 0.0
