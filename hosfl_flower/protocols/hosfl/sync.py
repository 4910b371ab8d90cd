"""The server's side of keeping nodes' ``θ_c`` in step through the ledger (HO-SFL, ZO-SFL, frozen
client): what each node has applied, the catch-up it needs, the final synchronisation, and their
checkpoint form."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...node.store import OPTIMIZER_PREFIX
from ...records import ledger_to_record
from ...schedule import SEED_BOUND
from ...zo import ClientOptimizer, Ledger, LedgerEntry, fingerprint
from ...zo.directions import DISTRIBUTIONS
from ..base import Link, NodeInfo
from ..messages import CatchUp, ReplyError
from .messages import SyncRequest, VersionedReply


def ledger_from_rows(rows: Any) -> Ledger:
    """The ledger from its checkpoint form ``[(round, seeds, scalars, lr, mu, directions), ...]``
    (checked as it is built); rows of five fields, written before directions were recorded, are gaussian.

    ``ValueError`` naming the row unless: rows are lists or tuples of five or six fields; rounds are
    ints ``>= 1``, increasing; seeds are ints in ``[0, 2**62)``; scalars are finite numbers, one per
    seed; ``lr`` is finite and ``>= 0``, ``mu`` finite and ``> 0``; directions a known distribution.
    Nothing is coerced: a ``"3"`` or a ``True`` where a number belongs is refused.
    """
    if not isinstance(rows, (list, tuple)):
        raise ValueError(f"the ledger is {_kind(rows)}, expected a list of rows")
    entries: list[LedgerEntry] = []
    for position, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) not in (5, 6):
            raise ValueError(f"ledger row {position} is {_kind(row)} of length {_length(row)}, expected 5 or 6 fields")
        r, seeds, scalars, lr, mu, *rest = row
        directions = rest[0] if rest else "gaussian"
        where = f"ledger row {position} (round {r!r})"
        if not _is_int(r) or r < 1:
            raise ValueError(f"{where}: the round must be an int >= 1")
        if entries and r <= entries[-1].round:
            raise ValueError(f"{where}: rounds must increase, round {r} after {entries[-1].round}")
        if not isinstance(seeds, (list, tuple)) or not all(_is_int(x) and 0 <= x < SEED_BOUND for x in seeds):
            raise ValueError(f"{where}: seeds must be a list of ints in [0, 2**62)")
        if not isinstance(scalars, (list, tuple)) or not all(_is_finite(v) for v in scalars):
            raise ValueError(f"{where}: scalars must be a list of finite numbers")
        if len(scalars) != len(seeds):
            raise ValueError(f"{where}: {len(seeds)} seeds but {len(scalars)} scalars")
        if not _is_finite(lr) or lr < 0:
            raise ValueError(f"{where}: lr={lr!r} must be a finite number >= 0")
        if not _is_finite(mu) or mu <= 0:
            raise ValueError(f"{where}: mu={mu!r} must be a finite number > 0")
        if not isinstance(directions, str) or directions not in DISTRIBUTIONS:
            raise ValueError(f"{where}: directions={directions!r} must be one of {', '.join(DISTRIBUTIONS)}")
        entries.append(
            LedgerEntry(r, tuple(int(x) for x in seeds), tuple(float(v) for v in scalars), float(lr), float(mu), directions)
        )
    return Ledger(entries)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value: Any) -> str:
    return f"a {type(value).__name__}"


def _length(value: Any) -> str:
    return str(len(value)) if isinstance(value, (list, tuple, str, dict)) else "-"


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

    def check_state(self, state: Any, optimizer: ClientOptimizer) -> None:
        """``ValueError`` (or ``TypeError``) naming what is wrong unless :meth:`state`'s form fits:
        exactly its three parts, a valid ledger (:func:`ledger_from_rows`), an optimizer state that
        fits these parameters (``optimizer`` is a scratch one it is loaded into), and node versions
        ``{partition: (applied round, needs repair)}`` no later than the ledger. Nothing is loaded."""
        if not isinstance(state, Mapping):
            raise TypeError(f"it is {_kind(state)}, expected a dict")
        parts = ("ledger", "client-optimizer", "node-sync")
        for key in parts:
            if key not in state:
                raise ValueError(f"lacks {key}")
        unexpected = sorted(set(state) - set(parts), key=str)
        if unexpected:
            raise ValueError(f"has unexpected parts {unexpected[:3]}")
        ledger = ledger_from_rows(state["ledger"])
        if not isinstance(state["client-optimizer"], Mapping):
            raise TypeError(f"its client-optimizer is {_kind(state['client-optimizer'])}, expected a dict of tensors")
        try:
            optimizer.load_state_tensors(dict(state["client-optimizer"]), self.params)
        except (TypeError, ValueError) as error:
            raise ValueError(f"its client optimizer state is invalid: {error}") from None
        sync = state["node-sync"]
        if not isinstance(sync, Mapping):
            raise TypeError(f"its node-sync is {_kind(sync)}, expected a dict")
        for partition, value in sync.items():
            where = f"node-sync of partition {partition!r}"
            if not _is_int(partition) or partition < 0:
                raise ValueError(f"{where}: the partition must be an int >= 0")
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError(f"{where} is {_kind(value)}, expected (applied round, needs repair)")
            applied, repair = value
            if not _is_int(applied) or not 0 <= applied <= ledger.last_round:
                raise ValueError(f"{where}: applied round {applied!r} must be an int in 0..{ledger.last_round}")
            if not isinstance(repair, bool):
                raise ValueError(f"{where}: needs-repair is {_kind(repair)}, expected a bool")

    def load(self, state: Mapping[str, Any], optimizer: ClientOptimizer) -> None:
        """Load a :meth:`check_state`-checked state (everything is built before anything is replaced)."""
        ledger = ledger_from_rows(state["ledger"])
        optimizer.load_state_tensors(dict(state["client-optimizer"]), self.params)
        saved = {int(p): (int(applied), bool(repair)) for p, (applied, repair) in state["node-sync"].items()}
        self.ledger, self.optimizer, self.saved = ledger, optimizer, saved
        self.node_applied, self.needs_weights = {}, set()

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {k: v.detach().clone() for k, v in self.client_state().items()}
        tensors.update({OPTIMIZER_PREFIX + k: v.clone() for k, v in self.optimizer.state_tensors().items()})
        return tensors

    def _state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._state_tensors().values())
