"""Example-weighted averaging of model states (FedAvg of client segments and heads)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``Σ_n w_n θ_n / Σ_n w_n`` per tensor; integer tensors (counters) come from the first state."""
    if not states or len(states) != len(weights):
        raise ValueError(f"{len(states)} states for {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    keys = list(states[0])
    for state in states[1:]:
        if list(state) != keys:
            raise ValueError("states to average have different keys")
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
