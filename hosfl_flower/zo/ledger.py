"""The ledger of HO-SFL client updates, and their replay (docs/protocols.md, "HO-SFL", catch-up).

Each round that updates the client segment leaves one entry ``(t, seeds, v̄, lr, μ, directions)``.
Applying the entries in order to the shared initial weights, with the same optimizer, reproduces
``θ_c`` bit for bit on the server's replica and on every client, however late a client catches up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .directions import _THREAD, _direction_seed, _transient, check_distribution
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


def _zo_gradient(
    index: int, param: torch.Tensor, seeds: Sequence[int], coefficients: Sequence[float], distribution: str
) -> torch.Tensor:
    # the caller holds torch.no_grad(); each direction is consumed before the next one is drawn
    state = _THREAD
    generator = state.generator
    grad = torch.zeros_like(param)
    for seed, coefficient in zip(seeds, coefficients):
        generator.manual_seed(_direction_seed(seed, index))
        grad.add_(_transient(state, param, distribution), alpha=coefficient)
    return grad


@torch.no_grad()
def zo_gradient(
    index: int,
    param: torch.Tensor,
    seeds: Sequence[int],
    coefficients: Sequence[float],
    distribution: str = "gaussian",
) -> torch.Tensor:
    """``ĝ_i = Σ_p c_p u_p,i`` for one parameter, regenerated from the seeds."""
    return _zo_gradient(index, param, seeds, coefficients, distribution)


@torch.no_grad()
def apply_entry(params: Sequence[torch.Tensor], optimizer: ClientOptimizer, entry: LedgerEntry, first_index: int = 0) -> None:
    """Apply one ledger entry to ``params`` in place (one parameter at a time).

    ``first_index`` is the direction index of ``params[0]`` (see :func:`perturb_`).
    """
    if not entry.seeds:
        return
    coefficients = entry.coefficients()
    optimizer.begin_step()
    for position, param in enumerate(params):
        grad = _zo_gradient(first_index + position, param, entry.seeds, coefficients, entry.directions)
        optimizer.step_param(position, param, grad, entry.lr)


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
