"""The ledger of HO-SFL client updates, and their replay (docs/protocols.md, "HO-SFL", catch-up).

Each round that updates the client segment leaves one entry ``(t, seeds, v̄, lr, μ, directions)``.
Applying the entries in order to the shared initial weights, with the same optimizer, reproduces
``θ_c`` bit for bit on the server's replica and on every client, however late a client catches up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .directions import check_distribution, gradient_blocks
from .optim import ClientOptimizer


@dataclass(frozen=True)
class LedgerEntry:
    """One round's client update: its seeds, the aggregated scalars ``v̄_p``, and the step's settings.

    ``directions`` is the distribution the seeds' directions are drawn from (see
    :data:`~hosfl_flower.zo.directions.DISTRIBUTIONS`): the entry names it, so replay never depends on a
    node's own settings.
    """

    round: int
    seeds: tuple[int, ...]
    scalars: tuple[float, ...]
    lr: float
    mu: float
    directions: str = "gaussian"

    def __post_init__(self) -> None:
        check_distribution(self.directions)
        if len(self.seeds) != len(self.scalars):
            raise ValueError(f"ledger entry for round {self.round}: {len(self.seeds)} seeds but {len(self.scalars)} scalars")

    def coefficients(self) -> list[float]:
        """``v̄_p / (P μ)``: the weight of direction ``u_p`` in the estimate ``ĝ``."""
        denom = len(self.seeds) * self.mu
        return [float(v) / denom for v in self.scalars]


def _on(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return grad if grad.dtype == param.dtype and grad.device == param.device else grad.to(device=param.device, dtype=param.dtype)


@torch.no_grad()
def apply_entry(params: Sequence[torch.Tensor], optimizer: ClientOptimizer, entry: LedgerEntry, offset: int = 0) -> None:
    """Apply one ledger entry to ``params`` in place, one block of the directions' stream at a time.

    ``offset`` is the stream position of ``params[0]`` (see :func:`~hosfl_flower.zo.directions.perturb_`).
    """
    if not entry.seeds:
        return
    optimizer.begin_step()
    for block, _, grads in gradient_blocks(params, entry.seeds, entry.coefficients(), offset, entry.directions):
        pieces = block.pieces
        if all(piece.whole for piece in pieces):
            targets = [params[piece.position] for piece in pieces]
            optimizer.step_params(
                [piece.position for piece in pieces], targets, [_on(g, p) for g, p in zip(grads, targets)], entry.lr
            )
            continue
        for piece, grad in zip(pieces, grads):
            param = params[piece.position]
            span = None if piece.whole else (piece.start, piece.stop)
            optimizer.step_param(piece.position, param, _on(grad, param), entry.lr, span)


def replay(params: Sequence[torch.Tensor], optimizer: ClientOptimizer, entries: Iterable[LedgerEntry]) -> None:
    """Apply ``entries`` in order: how a client catches up."""
    for entry in entries:
        apply_entry(params, optimizer, entry)


class Ledger:
    """Append-only history of client updates, with per-round lookup for catch-up."""

    def __init__(self, entries: Iterable[LedgerEntry] = ()) -> None:
        self._entries: list[LedgerEntry] = []
        for entry in entries:
            self.append(entry)

    def append(self, entry: LedgerEntry) -> None:
        """Add the entry of a round later than every entry already held."""
        if self._entries and entry.round <= self._entries[-1].round:
            raise ValueError(f"ledger entries must have increasing rounds: {entry.round} after {self._entries[-1].round}")
        self._entries.append(entry)

    def since(self, applied_round: int) -> list[LedgerEntry]:
        """Entries a node that has applied every round up to ``applied_round`` still lacks."""
        lo, hi = 0, len(self._entries)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._entries[mid].round <= applied_round:
                lo = mid + 1
            else:
                hi = mid
        return self._entries[lo:]

    @property
    def last_round(self) -> int:
        """Round of the newest entry (0 when empty)."""
        return self._entries[-1].round if self._entries else 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)
