"""Combining the replies of a round: the example-weighted mean (the papers'), robust coordinate-wise
rules for a federation with a minority of bad nodes, and a bound on each reply's size.

The run config's ``aggregation.rule`` key picks the rule; the same rule combines the scalar uplink of
HO-SFL / ZO-SFL (one vector of ``P`` numbers per reply) and the model states of SplitFed, HERON-SFL
and FedAvg (all floating-point tensors of a state, flattened into one vector per reply):

- ``mean``: ``Σ_n w_n x_n / Σ_n w_n``.
- ``median``: the coordinate-wise median (the mean of the two middle values for an even count).
- ``trimmed-mean``: per coordinate, the ``k = ⌈β n⌉`` smallest and ``k`` largest values are dropped
  (``β = aggregation.trim-fraction``; at least one value is kept) and the rest averaged.
- ``clipped-mean``: per coordinate, each value's distance from the median is clipped to
  ``aggregation.clip-factor`` times the median absolute deviation, then the weighted mean is taken.

The robust rules are unweighted except ``clipped-mean``: a reply's weight cannot buy it influence.
:class:`ReplyBound` rejects, before any rule runs, a reply whose size (a statistic the protocol
computes from what the server knows, e.g. ``‖v_n‖ / ‖λ_n‖``) exceeds ``aggregation.reply-bound``
times the median size of the replies accepted so far and this round's.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch

AGGREGATORS = ("mean", "median", "trimmed-mean", "clipped-mean")
K = TypeVar("K")
HISTORY = 8
"""How many accepted reply sizes :class:`ReplyBound` remembers (a few rounds: honest sizes drift as a run trains)."""


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``Σ_n w_n θ_n / Σ_n w_n`` per tensor; integer tensors (counters) come from the first state."""
    keys = _check_states(states, weights)
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("weights must sum to a positive number")
    averaged = {}
    for key in keys:
        first = states[0][key]
        if not first.is_floating_point():
            averaged[key] = first.clone()
            continue
        out = first * (weights[0] / total)
        for state, weight in zip(states[1:], weights[1:]):
            out = out + state[key] * (weight / total)
        averaged[key] = out
    return averaged


def combine_rows(
    rule: str, rows: torch.Tensor, weights: Sequence[float], trim_fraction: float, clip_factor: float
) -> torch.Tensor:
    """``rule`` applied to the rows of ``rows`` (``n × d``), one row per reply: a vector of ``d``."""
    n = rows.shape[0]
    if n == 0 or n != len(weights):
        raise ValueError(f"{n} replies for {len(weights)} weights")
    w = torch.tensor([float(x) for x in weights], dtype=rows.dtype)
    if rule == "mean":
        return (w[:, None] * rows).sum(0) / w.sum()
    ordered = rows.sort(dim=0).values
    median = ordered[(n - 1) // 2 : n // 2 + 1].mean(0)
    if rule == "median":
        return median
    if rule == "trimmed-mean":
        k = min(math.ceil(trim_fraction * n), (n - 1) // 2)
        return ordered[k : n - k].mean(0)
    if rule == "clipped-mean":
        deviations = rows - median
        spread = deviations.abs().sort(dim=0).values[(n - 1) // 2 : n // 2 + 1].mean(0)  # the median absolute deviation
        clipped = torch.maximum(torch.minimum(deviations, clip_factor * spread), -clip_factor * spread)
        return median + (w[:, None] * clipped).sum(0) / w.sum()
    raise ValueError(f"unknown aggregation {rule!r}; allowed: {', '.join(AGGREGATORS)}")


class Aggregator:
    """The run's rule (``aggregation``) with its parameters, for scalar vectors and for model states."""

    def __init__(self, rule: str = "mean", trim_fraction: float = 0.2, clip_factor: float = 2.0) -> None:
        if rule not in AGGREGATORS:
            raise ValueError(f"unknown aggregation {rule!r}; allowed: {', '.join(AGGREGATORS)}")
        self.rule, self.trim_fraction, self.clip_factor = rule, trim_fraction, clip_factor

    def scalars(self, per_reply: Sequence[Sequence[float]], weights: Sequence[float]) -> tuple[float, ...]:
        """The combined vector of equally long scalar vectors (float64)."""
        if not per_reply or len({len(v) for v in per_reply}) != 1:
            raise ValueError("replies to combine must be non-empty and of one length")
        rows = torch.tensor([[float(x) for x in v] for v in per_reply], dtype=torch.float64)
        combined = combine_rows(self.rule, rows, weights, self.trim_fraction, self.clip_factor)
        return tuple(float(x) for x in combined)

    def states(self, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        """The combined state; ``mean`` is :func:`weighted_average`, the other rules treat all
        floating-point tensors of a state as one vector (integer tensors come from the first state)."""
        if self.rule == "mean":
            return weighted_average(states, weights)
        keys = _check_states(states, weights)
        floats = [k for k in keys if states[0][k].is_floating_point()]
        combined = {k: states[0][k].clone() for k in keys if k not in floats}
        if floats:
            rows = torch.stack([torch.cat([s[k].detach().reshape(-1).double() for k in floats]) for s in states])
            vector = combine_rows(self.rule, rows, weights, self.trim_fraction, self.clip_factor)
            offset = 0
            for key in floats:
                like = states[0][key]
                combined[key] = vector[offset : offset + like.numel()].reshape(like.shape).to(like.dtype)
                offset += like.numel()
        return {k: combined[k] for k in keys}


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a state's tensors (weights and buffers), as a transfer of them would count them."""
    return sum(t.numel() * t.element_size() for t in state.values())


def state_distance(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """``‖θ − θ_ref‖₂`` over the floating-point tensors both states hold (float64 sum)."""
    total = 0.0
    for key, value in state.items():
        base = reference.get(key)
        if base is not None and value.is_floating_point() and base.shape == value.shape:
            total += float((value.double() - base.double()).square().sum())
    return math.sqrt(total)


class ReplyBound:
    """Rejects a reply whose size exceeds ``factor`` × the median size of the replies accepted so far
    (the last :data:`HISTORY`) together with this round's; ``factor = 0`` turns the bound off
    (a non-finite size is rejected even then)."""

    def __init__(self, factor: float) -> None:
        self.factor = float(factor)
        self.history: deque[float] = deque(maxlen=HISTORY)

    def screen(self, sizes: Mapping[K, float]) -> set[K]:
        """The keys of ``sizes`` to reject; the sizes of the others join the history."""
        finite = {key: size for key, size in sizes.items() if math.isfinite(size)}
        rejected = set(sizes) - set(finite)
        if self.factor > 0 and finite:
            values = sorted([*self.history, *finite.values()])
            middle = len(values) // 2
            median = values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])
            rejected |= {key for key, size in finite.items() if size > self.factor * median}
        self.history.extend(size for key, size in finite.items() if key not in rejected)
        return rejected


def _check_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> list[str]:
    if not states or len(states) != len(weights):
        raise ValueError(f"{len(states)} states for {len(weights)} weights")
    keys = list(states[0])
    for state in states[1:]:
        if list(state) != keys:
            raise ValueError("states to combine have different keys")
    return keys
