"""Zeroth-order estimators.

HO-SFL's client minimises the linear surrogate ``λᵀ f_c(x; θ_c)``: for each shared direction
``u_p`` it reports ``v_p = ⟨λ, f_c(x; θ + μ u_p) − z⟩``; the aggregated estimate is
``ĝ = (1/(P μ)) Σ_p v̄_p u_p``, an estimate of the backprop gradient ``J_cᵀ λ``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .directions import draw_directions_, perturb_
from .ledger import zo_gradient


DOT_CHUNK = 1 << 15
"""Elements per chunk of :func:`dot64`: its float64 temporaries stay at 256 KiB whatever the tensor size."""

KEEP_DIRECTIONS_FLOATS = 1 << 16
"""Client segments up to this many trainable floats keep each probe's directions between perturbing and
restoring (drawn once instead of twice; at most 256 KiB). Larger ones redraw them."""


@torch.no_grad()
def dot64(a: torch.Tensor, b: torch.Tensor, chunk: int = DOT_CHUNK) -> float:
    """``⟨a, b⟩`` with float64 products and float64 sums, a chunk at a time (no full-size temporaries).

    The products of float32 values are exact in float64. The result depends only on the values and on
    ``chunk`` (chunk sums are added left to right), so every party that calls it gets the same bits.
    """
    if a.numel() != b.numel():
        raise ValueError(f"dot of tensors with {a.numel()} and {b.numel()} elements")
    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() <= chunk:
        part = a.to(torch.float64, copy=True)
        return float(part.mul_(b).sum())
    total = 0.0
    for start in range(0, a.numel(), chunk):
        part = a[start : start + chunk].to(torch.float64, copy=True)  # never an alias of a
        part.mul_(b[start : start + chunk])
        total += float(part.sum())
    return total


@torch.no_grad()
def hybrid_probe_scalars(
    forward: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    anchor: torch.Tensor | float,
    lam: torch.Tensor,
    seeds: Sequence[int],
    mu: float,
) -> list[float]:
    """HO-SFL client probes: ``v_p = ⟨λ, f_c(θ + μ u_p) − z⟩`` for each seed, forward passes only.

    ``forward`` evaluates the client segment at the current (perturbed) parameters. Parameters are
    perturbed in place and restored by the opposite step, so memory stays at inference level; the
    caller owns the canonical copy of ``θ_c`` (restoring by subtraction may differ in the last bit).

    ``anchor`` is ``z`` or, already folded, ``⟨λ, z⟩`` as a float (:func:`dot64`), which lets the caller
    free ``z`` before the probes. Each scalar is computed as ``⟨λ, z̃_p⟩ − ⟨λ, z⟩`` with float64
    products (:func:`dot64`), and each ``z̃_p`` is released before the next forward pass, so at most one
    perturbed output is alive at a time and no ``z̃ − z`` temporary is made.
    """
    if isinstance(anchor, torch.Tensor):
        if anchor.shape != lam.shape:
            raise ValueError(f"λ has shape {tuple(lam.shape)} but z has shape {tuple(anchor.shape)}")
        base = dot64(lam, anchor)
    else:
        base = float(anchor)
    scalars = []
    kept = None  # the directions of the current seed, when they are small enough to keep
    if sum(p.numel() for p in params) <= KEEP_DIRECTIONS_FLOATS and all(
        p.dtype is torch.float32 and p.is_cpu for p in params
    ):
        kept = [torch.empty(p.shape, dtype=torch.float32) for p in params]
    for seed in seeds:
        if kept is None:
            perturb_(params, seed, mu)
        else:  # the same values perturb_ draws, drawn once for both steps
            draw_directions_(kept, seed)
            for param, u in zip(params, kept):
                param.add_(u, alpha=mu)
        try:
            perturbed = forward()
        finally:
            if kept is None:
                perturb_(params, seed, -mu)
            else:
                for param, u in zip(params, kept):
                    param.add_(u, alpha=-mu)
        if perturbed.shape != lam.shape:
            raise ValueError(f"λ has shape {tuple(lam.shape)} but f_c returned {tuple(perturbed.shape)}")
        scalars.append(dot64(lam, perturbed) - base)
        del perturbed  # free z̃_p before the next forward pass
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
