"""HO-SFL (PROTOCOLS §1): zeroth-order clients, first-order server, dimension-free aggregation.

Round ``t``: ``train.smash`` (ledger entries the node lacks → ``z``, ``y``, fingerprint), one
first-order server step giving ``λ_n``, ``train.probe`` (``λ_n``, the round's seeds, ``μ``, the
estimator and the directions' distribution → ``P`` scalars), then ``v̄`` joins the ledger and updates
the server's replica of ``θ_c``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
import math
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from ..accounting import RoundAccount
from ..checkpoint import CheckpointError
from ..config import ConfigError, resolve_run_config
from ..client import OPTIMIZER_PREFIX
from ..data import Examples
from ..models import SplitModel
from ..records import ledger_to_record, tensors_to_record
from ..zo import ClientUpdateRule, Ledger, LedgerEntry, aggregate_scalars, apply_entry, check_jvp, fingerprint, make_client_optimizer
from .base import NodeInfo, ReplyError, SplitStrategy, error_text, meta_seconds


@dataclass
class SmashedReply:
    """A validated smash reply."""

    node: NodeInfo
    smashed: dict[str, torch.Tensor]
    labels: torch.Tensor
    client_seconds: float
    perturbed: list[torch.Tensor] | None = None

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])


def _ledger_from_state(rows) -> Ledger:
    """The ledger from its checkpoint form ``[(round, seeds, scalars, lr, mu, directions), ...]`` (checked as
    it is built); rows of five fields, written before directions were recorded, are gaussian."""

    def entry(r, seeds, scalars, lr, mu, directions="gaussian") -> LedgerEntry:
        return LedgerEntry(
            int(r), tuple(int(x) for x in seeds), tuple(float(v) for v in scalars), float(lr), float(mu), str(directions)
        )

    return Ledger(entry(*row) for row in rows)


def _check_estimator(model: SplitModel, test: Examples, cfg: Mapping[str, Any]) -> None:
    """Fail at setup, with one line, if the configured estimator cannot run through the client segment.

    Only ``jvp`` may not: it needs a forward-mode derivative of every operation of ``f_c``. The check
    runs one probe on one held-out example and leaves the model untouched.
    """
    if cfg["zo.estimator"] != "jvp" or not cfg["zo.num-perturbations"] or len(test) == 0:
        return
    inputs = test.take(torch.arange(1)).inputs
    try:
        check_jvp(lambda: model.smash(inputs)["z"], model.client)
    except ValueError as error:
        raise ConfigError("zo.estimator", "jvp", f"cannot be used with model {cfg['model']!r}: {error}") from None


class HOSFLStrategy(SplitStrategy):
    """HO-SFL as a Flower strategy. The server keeps the ledger and a replica of ``θ_c``."""

    name = "hosfl"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ledger = Ledger()
        self.client_optimizer = make_client_optimizer(self.cfg["client.optimizer"], self.cfg["client.weight-decay"])
        self.update_rule = ClientUpdateRule.from_config(self.cfg)
        self.node_applied: dict[int, int] = {}
        self.needs_weights: set[int] = set()
        self._saved_sync: dict[int, tuple[int, bool]] = {}
        self._round: dict[str, Any] = {}
        _check_estimator(self.model, self.test, self.cfg)

    # ------------------------------------------------------------------ node sync state and checkpoints
    def node_discovered(self, node: NodeInfo, info: ConfigRecord) -> None:
        """Start from the round the node says it has applied; a node ahead of the ledger (its state
        outlived a server restart from an older checkpoint) is repaired with the weights."""
        reported = int(info.get("applied-round", 0))
        if reported > self.ledger.last_round:
            self.needs_weights.add(node.node_id)
            reported = 0
        saved = self._saved_sync.get(node.partition_id)
        if saved is not None and saved[0] == reported and saved[1]:
            self.needs_weights.add(node.node_id)
        self.node_applied[node.node_id] = reported

    def checkpoint_state(self) -> dict[str, Any]:
        """The base state plus the ledger, the client optimizer of the replica and each node's sync state."""
        partition = {node_id: node.partition_id for node_id, node in self.nodes.items()}
        return {
            **super().checkpoint_state(),
            "ledger": [(e.round, list(e.seeds), list(e.scalars), e.lr, e.mu, e.directions) for e in self.ledger],
            "client-optimizer": {k: v.clone() for k, v in self.client_optimizer.state_tensors().items()},
            "node-sync": {
                partition[n]: (applied, n in self.needs_weights) for n, applied in self.node_applied.items() if n in partition
            },
        }

    def checkpoint_state_keys(self) -> tuple[str, ...]:
        return (*super().checkpoint_state_keys(), "ledger", "client-optimizer", "node-sync")

    def check_checkpoint_state(self, state) -> None:
        super().check_checkpoint_state(state)
        try:
            _ledger_from_state(state["ledger"])
            trial = make_client_optimizer(self.cfg["client.optimizer"], self.cfg["client.weight-decay"])
            trial.load_state_tensors(dict(state["client-optimizer"]))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint's ledger or client optimizer is invalid: {error}") from None

    def load_checkpoint_state(self, state) -> None:
        super().load_checkpoint_state(state)
        self.ledger = _ledger_from_state(state["ledger"])
        self.client_optimizer = make_client_optimizer(self.cfg["client.optimizer"], self.cfg["client.weight-decay"])
        self.client_optimizer.load_state_tensors(dict(state["client-optimizer"]))
        self._saved_sync = {int(p): (int(applied), bool(repair)) for p, (applied, repair) in state["node-sync"].items()}
        self.node_applied, self.needs_weights = {}, set()

    # ------------------------------------------------------------------ catch-up
    def catch_up_records(self, node: NodeInfo) -> dict[str, Any]:
        """Records bringing ``node`` up to date: its missing ledger entries, or the weights when that is
        cheaper in bytes or the node must be repaired."""
        applied = self.node_applied.get(node.node_id, 0)
        entries = self.ledger.since(applied)
        records: dict[str, Any] = {"sync": ConfigRecord({"from-round": applied})}
        if entries:
            records["ledger"] = ledger_to_record(entries)
        if node.node_id in self.needs_weights or (
            entries and records["ledger"].count_bytes() > self._client_state_bytes()
        ):
            last = self.ledger.last_round
            records = {
                "client-state": tensors_to_record(self._client_state_tensors()),
                "sync": ConfigRecord({"from-round": last, "replacement-round": last}),
            }
        return records

    def _client_state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.model.client_state())
        tensors.update({OPTIMIZER_PREFIX + k: v for k, v in self.client_optimizer.state_tensors().items()})
        return tensors

    def _client_state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._client_state_tensors().values())

    # ------------------------------------------------------------------ exchange 1: smash
    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord | None, grid: Grid) -> list[Message]:
        """Sample the round's nodes, draw its seeds, and build the ``train.smash`` messages.

        ``arrays`` and ``config`` are unused: the strategy owns the model, and per-run settings
        come from the run config (``start(train_config=...)`` adds keys to every message).
        """
        nodes = self.sample_nodes(server_round, list(self.nodes.values()))
        self._round = {
            "nodes": nodes,
            "seeds": self.schedule.seeds(self.cfg["zo.num-perturbations"]),
            "fingerprint": fingerprint(self.model.client_parameters()),
        }
        return [self.message(node, "train.smash", server_round, self.catch_up_records(node)) for node in nodes]

    def validate_smash(self, reply: Message, node: NodeInfo) -> SmashedReply:
        """Check a smash reply before it touches any state; raise :class:`ReplyError`."""
        if reply.has_error():
            raise ReplyError("error", error_text(reply))
        meta = reply.content.config_records.get("meta")
        if meta is None or "fingerprint" not in meta or "applied-round" not in meta:
            raise ReplyError("malformed", "missing meta")
        if meta["fingerprint"] != self._round["fingerprint"] or int(meta["applied-round"]) != self.ledger.last_round:
            self.needs_weights.add(node.node_id)
            raise ReplyError("fingerprint-mismatch", f"node at round {meta['applied-round']}")
        self.node_applied[node.node_id] = self.ledger.last_round
        self.needs_weights.discard(node.node_id)
        smashed, labels = self.parse_smashed(reply.content)
        if int(meta.get("num-examples", -1)) != labels.shape[0]:
            raise ReplyError("wrong-count", "num-examples disagrees with the labels")
        return SmashedReply(node, smashed, labels, float(meta.get("compute-seconds", 0.0)))

    # ------------------------------------------------------------------ exchange 2: probe
    def configure_probe(self, server_round: int, kept: Sequence[SmashedReply], grads: Sequence[torch.Tensor]) -> list[Message]:
        """``train.probe`` messages: ``λ_n``, the round's seeds, ``μ``, the estimator and the directions'
        distribution (the nodes take both from the message, not from their own run config)."""
        seeds = ConfigRecord(
            {
                "seeds": list(self._round["seeds"]),
                "mu": self.cfg["zo.mu"],
                "estimator": self.cfg["zo.estimator"],
                "directions": self.cfg["zo.directions"],
            }
        )
        return [
            self.message(reply.node, "train.probe", server_round, {"activation-grad": tensors_to_record({"z": lam}), "seeds": seeds})
            for reply, lam in zip(kept, grads)
        ]

    def validate_probe(self, reply: Message) -> list[float]:
        """Check a probe reply: exactly ``P`` finite scalars of sane size."""
        if reply.has_error():
            raise ReplyError("error", error_text(reply))
        scalars = reply.content.metric_records.get("scalars")
        if scalars is None or "values" not in scalars:
            raise ReplyError("malformed", "missing scalars")
        values = scalars["values"]
        values = [values] if isinstance(values, (int, float)) else list(values)
        if len(values) != len(self._round["seeds"]):
            raise ReplyError("wrong-count", f"{len(values)} scalars for {len(self._round['seeds'])} seeds")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ReplyError("non-finite", "scalars")
        if any(abs(v) > 1e12 for v in values):
            raise ReplyError("out-of-range", "scalars")
        return [float(v) for v in values]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the probe replies into ``v̄``, append it to the ledger and update the replica of ``θ_c``.

        With at least ``min-replies`` valid probe replies the server's pending step on ``θ_s`` is
        taken too; with fewer the round is skipped and neither segment changes.
        """
        smashed_by_node = {r.node.node_id: r for r in self._round["kept"]}
        probes = self.collect(
            replies,
            [r.node for r in self._round["kept"]],
            lambda reply, node: (smashed_by_node[node.node_id], self.validate_probe(reply), reply),
        )
        kept_scalars = [scalars for _, scalars, _ in probes]
        kept_examples = sum(smashed.num_examples for smashed, _, _ in probes)
        seconds = sum(meta_seconds(reply) for _, _, reply in probes)
        metrics = {"probe-replies": len(kept_scalars), "client-seconds": seconds}
        if not self.enough_replies(kept_scalars, "probe", metrics):
            self.split_server.discard_pending()
            return None, MetricRecord(metrics)
        self.split_server.apply_pending()
        total = sum(r.num_examples for r in self._round["kept"])
        entry = self.update_rule.entry(
            server_round, self._round["seeds"], aggregate_scalars(kept_scalars, kept_examples, total),
            self.model.client_parameters(),
        )
        self.ledger.append(entry)
        apply_entry(self.model.client_parameters(), self.client_optimizer, entry)
        return None, MetricRecord(metrics)

    # ------------------------------------------------------------------ the round
    def run_round(self, grid: Grid, server_round: int, account: RoundAccount) -> dict[str, Any]:
        """``train.smash`` → server step (held back until the probes arrive) → ``train.probe`` → ledger update."""
        replies = self.exchange(grid, self.configure_train(server_round, None, None, grid), account)
        kept: list[SmashedReply] = self.collect(replies, self._round["nodes"], self.validate_smash)
        self._round["kept"] = kept
        metrics: dict[str, Any] = {"sampled": len(self._round["nodes"]), "smash-replies": len(kept)}
        metrics.update({"samples": sum(r.num_examples for r in kept), "server-steps": 0})
        account.client_seconds += sum(r.client_seconds for r in kept)
        if not self.enough_replies(kept, "smash", metrics):
            return metrics
        probing = bool(self._round["seeds"])
        weights = self.aggregation_weights(server_round, [r.num_examples for r in kept])
        step = self.split_server.step([(r.smashed, r.labels) for r in kept], weights, apply=not probing)
        account.server_seconds += step.seconds
        metrics["train-loss"] = step.loss
        if probing:
            replies = self.exchange(grid, self.configure_probe(server_round, kept, step.activation_grads), account)
            _, probe_metrics = self.aggregate_train(server_round, replies)
            account.client_seconds += float(probe_metrics.pop("client-seconds"))
            metrics.update(dict(probe_metrics))
        metrics["server-steps"] = 0 if metrics.get("skipped") else 1
        return metrics

    def finish(self, grid: Grid) -> dict[str, Any]:
        """With ``final-sync``: bring every node up to date (``query.sync``) and check its fingerprint."""
        if not self.cfg["final-sync"]:
            return {}
        target = fingerprint(self.model.client_parameters())
        nodes = sorted(self.nodes.values(), key=lambda n: n.partition_id)
        messages = [
            Message(RecordDict(self.catch_up_records(n)), dst_node_id=n.node_id, message_type="query.sync", group_id="final-sync")
            for n in nodes
        ]
        by_node = self.reply_by_node(grid.send_and_receive(messages, timeout=self.timeout))
        synced, mismatched = 0, 0
        for node in nodes:
            reply = by_node.get(node.node_id)
            if reply is None or reply.has_error():
                continue
            meta = reply.content.config_records["meta"]
            if meta["fingerprint"] == target:
                synced += 1
                self.node_applied[node.node_id] = self.ledger.last_round
            else:
                mismatched += 1
        return {"final-sync-nodes": synced, "final-sync-mismatches": mismatched, "ledger-entries": len(self.ledger)}


class FrozenClientStrategy(HOSFLStrategy):
    """Ablation: HO-SFL with ``P = 0``. The server trains; the client segment keeps its initial weights."""

    name = "frozen-client"

    def __init__(self, model, test, run_config=None, split_server=None) -> None:
        config = {**resolve_run_config(run_config or {}), "zo.num-perturbations": 0}
        super().__init__(model, test, config, split_server)
