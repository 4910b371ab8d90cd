"""The server's random schedule: which partitions take part in a round, and the round's seeds.

One ``numpy`` generator seeded by the run's ``seed`` drives both, in a fixed order per round, so a
Flower run, a deployment and the in-process reference loop sample and seed identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np

SEED_BOUND = 2**62


class RoundSchedule:
    """Seeded draws of participants and direction seeds."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def sample(self, candidates: Sequence[int], k: int) -> list[int]:
        """``k`` distinct candidates, without replacement (all of them, in order, when ``k`` ≥ their number)."""
        ordered = sorted(candidates)
        if k >= len(ordered):
            return ordered
        picks = self.rng.choice(len(ordered), size=k, replace=False)
        return [ordered[int(i)] for i in picks]

    def seeds(self, count: int) -> tuple[int, ...]:
        """``count`` direction seeds for one round."""
        return tuple(int(s) for s in self.rng.integers(0, SEED_BOUND, size=count))

    def state(self) -> dict[str, Any]:
        """The generator state (for checkpoints)."""
        return cast(dict[str, Any], self.rng.bit_generator.state)  # a dict; numpy types it Mapping

    def set_state(self, state: dict) -> None:
        """Restore a state from :meth:`state`."""
        self.rng.bit_generator.state = state
