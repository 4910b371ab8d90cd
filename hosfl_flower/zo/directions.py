"""Seeded random directions (PROTOCOLS §5).

Direction ``u_p`` for trainable parameter ``i`` (``named_parameters()`` order, ``requires_grad``
only) is drawn in float32 by a CPU ``torch.Generator`` seeded from ``(seed_p, i)``, then moved to
the parameter's device and dtype. The stream therefore does not depend on the device a client runs on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

_MASK64 = (1 << 64) - 1


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


def direction(seed: int, index: int, like: torch.Tensor) -> torch.Tensor:
    """Gaussian direction for parameter ``index`` under ``seed``, shaped, placed and typed like ``like``."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mix_seed(seed, index))
    u = torch.randn(like.shape, generator=generator, dtype=torch.float32)
    if u.device != like.device or u.dtype != like.dtype:
        u = u.to(device=like.device, dtype=like.dtype)
    return u


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], seed: int, scale: float, first_index: int = 0) -> None:
    """In place: ``θ_i += scale · u_i(seed)`` for every parameter (MeZO-style, one tensor at a time).

    ``first_index`` numbers the parameters from that index on, so two segments (client, then
    server) can share one direction over their concatenation.
    """
    for index, param in enumerate(params, start=first_index):
        param.add_(direction(seed, index, param), alpha=scale)


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A cheap, exact fingerprint of parameter values: SHA-256 over their bytes, shapes and dtypes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:32]
