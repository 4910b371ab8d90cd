"""How a round's aggregated scalars become the client update: learning-rate schedule and clipping.

The server turns ``v̄`` into a :class:`LedgerEntry` once; every node replays the entry as it is, so a
stabiliser applied here changes nothing about dimension-free aggregation or replay. With the
defaults (constant rate, no clipping) the entry is the paper's ``θ_c ← θ_c − η ĝ``.

Why clipping (see docs/tuning.md): the estimate ``ĝ = (1/(Pμ)) Σ_p v̄_p u_p`` has the backprop gradient
``g`` as its mean but a norm near ``√(d_c/P)·‖g‖``: almost all of it is an isotropic random part. With
a fixed step that part is a random walk that inflates ``‖θ_c‖``, hence the activations and ``λ``, hence
the next update: a feedback loop that ends in a collapse. Clipping ``‖ĝ‖`` breaks the loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .directions import gradient_blocks
from .ledger import LedgerEntry

LR_SCHEDULES = ("constant", "cosine")


@torch.no_grad()
def estimate_norm(params: Sequence[torch.Tensor], entry: LedgerEntry) -> float:
    """``‖ĝ‖₂`` of the entry's estimate, regenerated one block of the stream at a time (float64 sum)."""
    total = 0.0
    for _, grad, _ in gradient_blocks(params, entry.seeds, entry.coefficients(), 0, entry.directions):
        total += float(grad.double().square().sum())
    return math.sqrt(total)


@dataclass(frozen=True)
class ClientUpdateRule:
    """The client step's settings: base learning rate, its schedule over the run, ``μ`` and clipping."""

    lr: float
    mu: float
    schedule: str = "constant"
    total_rounds: int = 1
    clip_grad_norm: float = 0.0
    directions: str = "gaussian"
    max_update_norm: float = math.inf
    """Hard cap on ``‖ĝ‖`` applied even with clipping off, so no entry replays an unbounded step."""

    def __post_init__(self) -> None:
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown client lr schedule {self.schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClientUpdateRule:
        """The rule of a resolved run config (``client.lr``, ``client.lr-schedule``, ``zo.mu``, ``zo.clip-grad-norm``)."""
        return cls(
            lr=config["client.lr"],
            mu=config["zo.mu"],
            schedule=config["client.lr-schedule"],
            total_rounds=config["num-server-rounds"],
            clip_grad_norm=config["zo.clip-grad-norm"],
            directions=config["zo.directions"],
            max_update_norm=config["zo.max-update-norm"],
        )

    def lr_at(self, server_round: int) -> float:
        """The learning rate of round ``server_round`` (1-based): constant, or cosine from ``lr`` towards 0."""
        if self.schedule == "cosine":
            progress = min(max(server_round - 1, 0) / max(self.total_rounds, 1), 1.0)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr

    def entry(
        self, server_round: int, seeds: Sequence[int], scalars: Sequence[float], params: Sequence[torch.Tensor]
    ) -> LedgerEntry:
        """The ledger entry of a round: ``v̄`` scaled down if ``‖ĝ‖`` exceeds the clip (or the hard
        cap ``max_update_norm``), at the round's rate.

        ``params`` are the client parameters the entry will be applied to (the server's replica), used
        only to measure ``‖ĝ‖``; they are not changed.
        """
        entry = LedgerEntry(
            server_round, tuple(seeds), tuple(float(v) for v in scalars), self.lr_at(server_round), self.mu, self.directions
        )
        return cap_entry(entry, params, self.clip_grad_norm, self.max_update_norm)


def cap_entry(entry: LedgerEntry, params: Sequence[torch.Tensor], clip: float, cap: float = math.inf) -> LedgerEntry:
    """``entry`` with ``v̄`` scaled down so that ``‖ĝ‖ ≤ min(clip, cap)`` (``clip = 0``: only ``cap``)."""
    limit = min(clip, cap) if clip > 0.0 else cap
    if not entry.seeds or not math.isfinite(limit):
        return entry
    norm = estimate_norm(params, entry)
    if norm > limit:
        scale = limit / norm
        entry = dataclasses.replace(entry, scalars=tuple(v * scale for v in entry.scalars))
    return entry
