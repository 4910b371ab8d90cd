"""The server's side of keeping nodes' ``θ_c`` in step through the ledger (HO-SFL, ZO-SFL, frozen
client): what each node has applied, the catch-up it needs, the final synchronisation, and their
checkpoint form."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...node.store import OPTIMIZER_PREFIX
from ...records import ledger_to_record
from ...zo import ClientOptimizer, Ledger, LedgerEntry, fingerprint
from ..base import Link, NodeInfo
from ..messages import CatchUp, ReplyError
from .messages import SyncRequest, VersionedReply


def ledger_from_rows(rows: Sequence[Sequence[Any]]) -> Ledger:
    """The ledger from its checkpoint form ``[(round, seeds, scalars, lr, mu, directions), ...]``
    (checked as it is built); rows of five fields, written before directions were recorded, are gaussian."""

    def entry(r, seeds, scalars, lr, mu, directions="gaussian") -> LedgerEntry:
        return LedgerEntry(
            int(r), tuple(int(x) for x in seeds), tuple(float(v) for v in scalars), float(lr), float(mu), str(directions)
        )

    return Ledger(entry(*row) for row in rows)


class LedgerSync:
    """The ledger, the server's client optimizer and each node's applied round."""

    def __init__(self, client_params: Sequence[torch.Tensor], client_state, optimizer: ClientOptimizer) -> None:
        self.ledger = Ledger()
        self.params = client_params
        self.client_state = client_state
        self.optimizer = optimizer
        self.node_applied: dict[int, int] = {}
        self.needs_weights: set[int] = set()
        self.saved: dict[int, tuple[int, bool]] = {}

    def node_discovered(self, node: NodeInfo, reported: int) -> None:
        """Start from the round the node says it has applied; a node ahead of the ledger (its state
        outlived a server restart from an older checkpoint), or one that needed a repair when the
        checkpoint was written, is repaired with the weights."""
        if reported > self.ledger.last_round:
            self.needs_weights.add(node.node_id)
            reported = 0
        saved = self.saved.get(node.partition_id)
        if saved is not None and saved[0] == reported and saved[1]:
            self.needs_weights.add(node.node_id)
        self.node_applied[node.node_id] = reported

    def catch_up(self, node: NodeInfo) -> CatchUp:
        """The node's missing ledger entries, or the weights when that is cheaper or it must be repaired."""
        applied = self.node_applied.get(node.node_id, 0)
        entries = list(self.ledger.since(applied))
        if node.node_id in self.needs_weights or (entries and ledger_to_record(entries).count_bytes() > self._state_bytes()):
            last = self.ledger.last_round
            return CatchUp(last, [], self._state_tensors(), last)
        return CatchUp(applied, entries)

    def check_version(self, node: NodeInfo, reply: VersionedReply, expected: str) -> None:
        """Accept a reply only from a node at the server's version; otherwise repair it next time."""
        if reply.fingerprint != expected or reply.applied_round != self.ledger.last_round:
            self.needs_weights.add(node.node_id)
            raise ReplyError("fingerprint-mismatch", f"node at round {reply.applied_round}")
        self.node_applied[node.node_id] = self.ledger.last_round
        self.needs_weights.discard(node.node_id)

    def append(self, entry: LedgerEntry) -> None:
        """Record a round's update and apply it to the server's ``θ_c``."""
        from ...zo import apply_entry

        self.ledger.append(entry)
        apply_entry(self.params, self.optimizer, entry)

    def final_sync(self, nodes: Sequence[NodeInfo], link: Link) -> dict[str, Any]:
        """Bring every node up to date and count how many end at the server's fingerprint."""
        target = fingerprint(self.params)
        ordered = sorted(nodes, key=lambda n: n.partition_id)
        replies = link.exchange([(node, SyncRequest(self.catch_up(node))) for node in ordered])
        synced = [node for node, reply in replies.items() if reply.fingerprint == target]
        for node in synced:
            self.node_applied[node.node_id] = self.ledger.last_round
        return {
            "final-sync-nodes": len(synced),
            "final-sync-mismatches": len(replies) - len(synced),
            "ledger-entries": len(self.ledger),
        }

    # ------------------------------------------------------------------ checkpoints
    def state(self, partitions: Mapping[int, int]) -> dict[str, Any]:
        return {
            "ledger": [(e.round, list(e.seeds), list(e.scalars), e.lr, e.mu, e.directions) for e in self.ledger],
            "client-optimizer": {k: v.clone() for k, v in self.optimizer.state_tensors().items()},
            "node-sync": {
                partitions[n]: (applied, n in self.needs_weights) for n, applied in self.node_applied.items() if n in partitions
            },
        }

    def load(self, state: Mapping[str, Any], optimizer: ClientOptimizer) -> None:
        self.ledger = ledger_from_rows(state["ledger"])
        optimizer.load_state_tensors(dict(state["client-optimizer"]))
        self.optimizer = optimizer
        self.saved = {int(p): (int(applied), bool(repair)) for p, (applied, repair) in state["node-sync"].items()}
        self.node_applied, self.needs_weights = {}, set()

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {k: v.detach().clone() for k, v in self.client_state().items()}
        tensors.update({OPTIMIZER_PREFIX + k: v.clone() for k, v in self.optimizer.state_tensors().items()})
        return tensors

    def _state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._state_tensors().values())
