"""Zeroth-order estimators.

HO-SFL's client minimises the linear surrogate ``λᵀ f_c(x; θ_c)``: for each shared direction
``u_p`` it reports one scalar ``v_p ≈ μ ⟨λ, J_c u_p⟩``; the aggregated estimate is
``ĝ = (1/(P μ)) Σ_p v̄_p u_p``, an estimate of the backprop gradient ``J_cᵀ λ``. The estimators of
:data:`ESTIMATORS` give ``v_p`` in the same units, so aggregation, the ledger and replay are the same
whichever a run uses (:func:`probe_scalars` picks one by name):

- ``forward``: ``⟨λ, f_c(θ + μ u_p) − z⟩``, the one-sided difference (``P`` forward passes);
- ``central``: ``⟨λ, f_c(θ + μ u_p) − f_c(θ − μ u_p)⟩ / 2`` (``2P`` forward passes, no ``z``; exact
  when ``f_c`` is quadratic in ``θ``);
- ``jvp``: ``μ ⟨λ, J_c u_p⟩`` exactly, by forward-mode autodiff: the ``μ → 0`` limit of both.

None of them records an autograd graph or keeps activations for a backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from .directions import (
    SeedDirection,
    check_distribution,
    seed_direction,
    trainable_names,
    trainable_parameters,
    zo_gradients,
)

ESTIMATORS = ("forward", "central", "jvp")
"""Names :func:`probe_scalars` accepts (the run-config key ``zo.estimator``)."""


DOT_CHUNK = 1 << 15
"""Elements per chunk of :func:`dot64`: its float64 temporaries stay at 256 KiB whatever the tensor size."""


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


def _fold(lam: torch.Tensor, output: torch.Tensor) -> float:
    """``⟨λ, output⟩`` (:func:`dot64`) after checking the shapes agree."""
    if output.shape != lam.shape:
        raise ValueError(f"λ has shape {tuple(lam.shape)} but f_c returned {tuple(output.shape)}")
    return dot64(lam, output)


@torch.no_grad()
def hybrid_probe_scalars(
    forward: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    anchor: torch.Tensor | float,
    lam: torch.Tensor,
    seeds: Sequence[int],
    mu: float,
    distribution: str = "gaussian",
) -> list[float]:
    """The ``forward`` estimator: ``v_p = ⟨λ, f_c(θ + μ u_p) − z⟩`` for each seed, forward passes only.

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
    shift = SeedDirection(params, distribution=distribution)
    scalars = []
    for seed in seeds:
        shift.select(seed)
        shift.move(mu)
        try:
            perturbed = forward()
        finally:
            shift.move(-mu)
        scalars.append(_fold(lam, perturbed) - base)
        del perturbed  # free z̃_p before the next forward pass
    return scalars


@torch.no_grad()
def central_probe_scalars(
    forward: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    lam: torch.Tensor,
    seeds: Sequence[int],
    mu: float,
    distribution: str = "gaussian",
) -> list[float]:
    """The ``central`` estimator: ``v_p = ⟨λ, f_c(θ + μ u_p) − f_c(θ − μ u_p)⟩ / 2`` (``2P`` forwards).

    No anchor ``z`` is needed. Parameters move ``θ → θ + μu → θ − μu → θ`` in place (the caller owns the
    canonical copy, as for :func:`hybrid_probe_scalars`); each output is folded into ``⟨λ, ·⟩`` and
    freed before the next forward pass.
    """
    shift = SeedDirection(params, distribution=distribution)
    scalars = []
    for seed in seeds:
        shift.select(seed)
        shift.move(mu)
        at = mu
        try:
            plus = _fold(lam, forward())
            shift.move(-2.0 * mu)
            at = -mu
            minus = _fold(lam, forward())
        finally:
            shift.move(-at)
        scalars.append((plus - minus) / 2.0)
    return scalars


class _Bound(nn.Module):
    """``forward()`` as the forward of a module holding ``segment``, so that ``functional_call`` can
    substitute the segment's parameters while it runs."""

    def __init__(self, segment: nn.Module, forward: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.segment = segment
        self.run = forward

    def forward(self) -> torch.Tensor:
        return self.run()


@torch.no_grad()
def jvp_probe_scalars(
    forward: Callable[[], torch.Tensor],
    module: nn.Module,
    lam: torch.Tensor,
    seeds: Sequence[int],
    mu: float,
    distribution: str = "gaussian",
) -> list[float]:
    """The ``jvp`` estimator: ``v_p = μ ⟨λ, J_c u_p⟩`` for each seed, exactly (``torch.func.jvp``).

    ``forward`` evaluates the client segment; ``module`` holds its parameters, and the directions are
    taken along ``trainable_parameters(module)``. Each probe is one forward pass that carries a tangent
    beside every activation: no graph is recorded, nothing is kept for a backward pass, and the
    parameters are never modified. A probe holds its full direction (``d_c`` values) while it runs.
    Attention runs on PyTorch's math kernel meanwhile (the fused ones have no forward-mode derivative).
    """
    check_distribution(distribution)
    params = trainable_parameters(module)
    if not params:
        return [0.0 for _ in seeds]
    bound = _Bound(module, forward)
    keys = [f"segment.{name}" for name in trainable_names(module)]
    primals = tuple(p.detach() for p in params)

    def evaluate(*values: torch.Tensor) -> torch.Tensor:
        return functional_call(bound, dict(zip(keys, values)), ())

    scalars = []
    with sdpa_kernel([SDPBackend.MATH]):
        for seed in seeds:
            tangents = tuple(seed_direction(params, seed, distribution=distribution))
            derivative = jvp(evaluate, primals, tangents)[1]
            del tangents
            scalars.append(mu * _fold(lam, derivative))
            del derivative
    return scalars


def probe_scalars(
    estimator: str,
    forward: Callable[[], torch.Tensor],
    module: nn.Module,
    lam: torch.Tensor,
    seeds: Sequence[int],
    mu: float,
    *,
    anchor: torch.Tensor | float | None = None,
    distribution: str = "gaussian",
) -> list[float]:
    """HO-SFL client probes with the estimator named ``estimator`` (:data:`ESTIMATORS`): one ``v_p`` per seed.

    ``forward`` evaluates the client segment ``module`` on the probe batch; directions (drawn from
    ``distribution``) are taken along ``trainable_parameters(module)``. ``anchor`` (``z`` or ``⟨λ, z⟩``)
    is used by ``forward`` only (:func:`needs_anchor`).
    """
    if estimator == "forward":
        if anchor is None:
            raise ValueError("the forward estimator needs the anchor z (or ⟨λ, z⟩)")
        return hybrid_probe_scalars(forward, trainable_parameters(module), anchor, lam, seeds, mu, distribution)
    if estimator == "central":
        return central_probe_scalars(forward, trainable_parameters(module), lam, seeds, mu, distribution)
    if estimator == "jvp":
        return jvp_probe_scalars(forward, module, lam, seeds, mu, distribution)
    raise ValueError(f"unknown estimator {estimator!r}; allowed: {', '.join(ESTIMATORS)}")


def needs_anchor(estimator: str) -> bool:
    """Whether ``estimator`` uses the unperturbed output ``z`` (only ``forward`` does)."""
    return estimator == "forward"


def check_jvp(forward: Callable[[], torch.Tensor], module: nn.Module) -> None:
    """Raise ``ValueError`` with a one-line reason if the ``jvp`` estimator cannot run through ``forward``.

    Meant for setup time, on one example; it does not modify the parameters.
    """
    try:
        with torch.no_grad():
            lam = torch.ones_like(forward())
        jvp_probe_scalars(forward, module, lam, [0], 1.0)
    except (NotImplementedError, RuntimeError) as error:
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        raise ValueError(f"forward-mode autodiff (torch.func.jvp) does not run through it ({reason})") from None


@torch.no_grad()
def estimate_gradient(
    params: Sequence[torch.Tensor],
    seeds: Sequence[int],
    scalars: Sequence[float],
    mu: float,
    distribution: str = "gaussian",
) -> list[torch.Tensor]:
    """The full estimate ``ĝ = (1/(P μ)) Σ_p v_p u_p``, one tensor per parameter (for analysis and tests)."""
    coefficients = [float(v) / (len(seeds) * mu) for v in scalars]
    return zo_gradients(params, seeds, coefficients, distribution=distribution)


def aggregate_scalars(per_client: Sequence[Sequence[float]], kept_weight: float, total_weight: float) -> tuple[float, ...]:
    """``v̄_p = Σ_n v_{n,p}``, rescaled by ``total_weight / kept_weight`` when some replies were dropped.

    Each client's ``v`` already carries its aggregation weight ``w_n`` through ``λ_n``, so the
    rescaling uses the weights of the replies kept and of all replies whose ``λ_n`` was computed
    (whatever the weights are, not only shares of examples); summing in the given order keeps every
    party's result bit-identical.
    """
    if not per_client:
        raise ValueError("no client scalars to aggregate")
    count = len(per_client[0])
    if any(len(v) != count for v in per_client):
        raise ValueError("clients reported different numbers of scalars")
    if kept_weight <= 0:
        raise ValueError("the kept replies' weights must sum to a positive number")
    scale = 1.0 if kept_weight == total_weight else total_weight / kept_weight
    sums = [0.0] * count
    for values in per_client:
        for p, value in enumerate(values):
            sums[p] += float(value)
    return tuple(s * scale if scale != 1.0 else s for s in sums)
