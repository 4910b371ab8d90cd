"""Zeroth-order estimators.

HO-SFL's client minimises the linear surrogate ``λᵀ f_c(x; θ_c)``: for each shared direction
``u_p`` it reports ``v_p = ⟨λ, f_c(x; θ + μ u_p) − z⟩``; the aggregated estimate is
``ĝ = (1/(P μ)) Σ_p v̄_p u_p``, an estimate of the backprop gradient ``J_cᵀ λ``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .directions import perturb_
from .ledger import zo_gradient


@torch.no_grad()
def hybrid_probe_scalars(
    forward: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    anchor: torch.Tensor,
    lam: torch.Tensor,
    seeds: Sequence[int],
    mu: float,
) -> list[float]:
    """HO-SFL client probes: ``v_p = ⟨λ, f_c(θ + μ u_p) − z⟩`` for each seed, forward passes only.

    ``forward`` evaluates the client segment at the current (perturbed) parameters. Parameters are
    perturbed in place and restored by the opposite step, so memory stays at inference level; the
    caller owns the canonical copy of ``θ_c`` (restoring by subtraction may differ in the last bit).
    """
    if anchor.shape != lam.shape:
        raise ValueError(f"λ has shape {tuple(lam.shape)} but z has shape {tuple(anchor.shape)}")
    scalars = []
    for seed in seeds:
        perturb_(params, seed, mu)
        try:
            perturbed = forward()
        finally:
            perturb_(params, seed, -mu)
        scalars.append(float(torch.sum((perturbed - anchor) * lam, dtype=torch.float64)))
    return scalars


@torch.no_grad()
def estimate_gradient(
    params: Sequence[torch.Tensor], seeds: Sequence[int], scalars: Sequence[float], mu: float
) -> list[torch.Tensor]:
    """The full estimate ``ĝ = (1/(P μ)) Σ_p v_p u_p``, one tensor per parameter (for analysis and tests)."""
    coefficients = [float(v) / (len(seeds) * mu) for v in scalars]
    return [zo_gradient(i, p, seeds, coefficients) for i, p in enumerate(params)]


def aggregate_scalars(per_client: Sequence[Sequence[float]], kept_examples: int, total_examples: int) -> tuple[float, ...]:
    """``v̄_p = Σ_n v_{n,p}``, rescaled by ``total / kept`` examples when some replies were dropped.

    Each client's ``v`` already carries its weight ``w_n`` through ``λ_n``; summing in the given order
    keeps every party's result bit-identical.
    """
    if not per_client:
        raise ValueError("no client scalars to aggregate")
    count = len(per_client[0])
    if any(len(v) != count for v in per_client):
        raise ValueError("clients reported different numbers of scalars")
    scale = total_examples / kept_examples
    sums = [0.0] * count
    for values in per_client:
        for p, value in enumerate(values):
            sums[p] += float(value)
    return tuple(s * scale if scale != 1.0 else s for s in sums)
