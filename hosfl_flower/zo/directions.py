"""Seeded random directions (docs/protocols.md, "HO-SFL", directions).

Direction ``u_p`` for trainable parameter ``i`` (``named_parameters()`` order, ``requires_grad``
only) is drawn in float32 by a CPU ``torch.Generator`` seeded from ``(seed_p, i)``, then moved to
the parameter's device and dtype. The stream therefore does not depend on the device a client runs on.

Two distributions (:data:`DISTRIBUTIONS`) share that scheme: ``gaussian`` (the default) is the
generator's ``randn`` stream; ``rademacher`` is its ``randint(0, 2)`` stream (serial, so independent
of thread count and CPU) mapped to ``±1``, each sign with probability 1/2.

Drawing a direction for a small tensor costs far more in fixed overhead than in random numbers, so the
draw reuses one CPU generator per thread (re-seeded with ``manual_seed``: the same seed gives the same
stream as a fresh generator), memoises the seed mix, and fills small directions into a per-thread
scratch buffer. None of this changes a drawn value.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterable, Sequence

import torch
from torch import nn

_MASK64 = (1 << 64) - 1

DISTRIBUTIONS = ("gaussian", "rademacher")
"""Distributions of the entries of a direction: standard normal, or ``±1`` with equal probability."""

SCRATCH_FLOATS = 1 << 16
"""Directions of float32 CPU tensors up to this many elements are drawn into a per-thread buffer of
their shape, reused by every later draw of that shape; larger ones get their own tensor, whose
allocation is small next to drawing its random numbers."""

SCRATCH_TOTAL_FLOATS = 1 << 20
"""Cap on the floats held in one thread's buffers (4 MiB); past it they are dropped and rebuilt."""


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit generator seed (order matters, no collisions by sum)."""
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK64))
    return state >> 1


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters a zeroth-order step perturbs: ``named_parameters()`` order, trainable only."""
    return [p for _, p in module.named_parameters() if p.requires_grad]


def trainable_names(module: nn.Module) -> list[str]:
    """Names matching :func:`trainable_parameters`, in the same order."""
    return [name for name, p in module.named_parameters() if p.requires_grad]


@functools.lru_cache(maxsize=1 << 16)
def _direction_seed(seed: int, index: int) -> int:
    """``mix_seed(seed, index)``, memoised: a round's seeds are drawn twice per probe and again at replay."""
    return mix_seed(seed, index)


class _ThreadState(threading.local):
    """One CPU generator and the scratch buffers of one thread (a generator is not safe to share)."""

    def __init__(self) -> None:
        self.generator = torch.Generator(device="cpu")
        self.buffers: dict[torch.Size, torch.Tensor] = {}
        self.buffered = 0


_THREAD = _ThreadState()


def _scratch(state: _ThreadState, shape: torch.Size) -> torch.Tensor | None:
    buffer = state.buffers.get(shape)
    if buffer is None:
        numel = shape.numel()
        if numel > SCRATCH_FLOATS:
            return None
        if state.buffered + numel > SCRATCH_TOTAL_FLOATS:
            state.buffers, state.buffered = {}, 0
        buffer = state.buffers[shape] = torch.empty(shape, dtype=torch.float32)
        state.buffered += numel
    return buffer


def _unknown_distribution(distribution: object) -> ValueError:
    return ValueError(f"unknown direction distribution {distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")


def check_distribution(distribution: str) -> str:
    """Return ``distribution`` if it is one of :data:`DISTRIBUTIONS`, else raise ``ValueError``."""
    if distribution not in DISTRIBUTIONS:
        raise _unknown_distribution(distribution)
    return distribution


def _fill_(buffer: torch.Tensor, generator: torch.Generator, distribution: str) -> torch.Tensor:
    """Overwrite a contiguous float32 CPU tensor with the next draws of ``generator``; returns it."""
    if distribution == "gaussian":
        # normal_ on a contiguous float32 tensor is exactly what torch.randn does after allocating it
        return buffer.normal_(generator=generator)
    if distribution == "rademacher":
        return buffer.random_(0, 2, generator=generator).mul_(2.0).sub_(1.0)
    raise _unknown_distribution(distribution)


def _draw(shape: torch.Size, generator: torch.Generator, distribution: str) -> torch.Tensor:
    """A new float32 CPU tensor of ``shape`` holding the next draws of ``generator``."""
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    return _fill_(torch.empty(shape, dtype=torch.float32), generator, distribution)


def _transient(state: _ThreadState, like: torch.Tensor, distribution: str = "gaussian") -> torch.Tensor:
    """The direction for ``like`` from ``state.generator`` as seeded; float32 CPU directions of small
    tensors are this thread's buffer of that shape, valid until the next draw of the same shape."""
    generator = state.generator
    if like.dtype is torch.float32 and like.is_cpu:
        buffer = _scratch(state, like.shape)
        if buffer is not None:
            return _fill_(buffer, generator, distribution)
        return _draw(like.shape, generator, distribution)
    return _draw(like.shape, generator, distribution).to(device=like.device, dtype=like.dtype)


def direction(seed: int, index: int, like: torch.Tensor, distribution: str = "gaussian") -> torch.Tensor:
    """Direction for parameter ``index`` under ``seed``, shaped, placed and typed like ``like``.

    The result is a new tensor the caller owns.
    """
    generator = _THREAD.generator
    generator.manual_seed(_direction_seed(seed, index))
    u = _draw(like.shape, generator, distribution)
    if u.device != like.device or u.dtype != like.dtype:
        u = u.to(device=like.device, dtype=like.dtype)
    return u


def transient_direction(seed: int, index: int, like: torch.Tensor, distribution: str = "gaussian") -> torch.Tensor:
    """:func:`direction` for immediate use: it may be a per-thread buffer that the next draw of the same
    shape in this thread overwrites (``x.add_(transient_direction(...))`` is the intended use)."""
    state = _THREAD
    state.generator.manual_seed(_direction_seed(seed, index))
    return _transient(state, like, distribution)


@torch.no_grad()
def draw_directions_(buffers: Sequence[torch.Tensor], seed: int, first_index: int = 0, distribution: str = "gaussian") -> None:
    """Fill each float32 CPU buffer with its direction under ``seed`` (buffer ``k`` gets direction
    ``first_index + k``): the values :func:`direction` returns, without allocating."""
    state = _THREAD
    generator = state.generator
    for index, buffer in enumerate(buffers, start=first_index):
        if buffer.dtype is not torch.float32 or not buffer.is_cpu or not buffer.is_contiguous():
            raise ValueError("direction buffers must be contiguous float32 CPU tensors")
        generator.manual_seed(_direction_seed(seed, index))
        _fill_(buffer, generator, distribution)


@torch.no_grad()
def perturb_(
    params: Sequence[torch.Tensor], seed: int, scale: float, first_index: int = 0, distribution: str = "gaussian"
) -> None:
    """In place: ``θ_i += scale · u_i(seed)`` for every parameter (MeZO-style, one tensor at a time).

    ``first_index`` numbers the parameters from that index on, so two segments (client, then
    server) can share one direction over their concatenation.
    """
    state = _THREAD
    generator = state.generator
    for index, param in enumerate(params, start=first_index):
        generator.manual_seed(_direction_seed(seed, index))
        param.add_(_transient(state, param, distribution), alpha=scale)


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A cheap, exact fingerprint of parameter values: SHA-256 over their bytes, shapes and dtypes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        if t.numel():  # hashed through the buffer protocol: no copy of the bytes
            # (numpy's stubs declare ndarray's buffer protocol for Python >= 3.12 only)
            digest.update(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    return digest.hexdigest()[:32]
