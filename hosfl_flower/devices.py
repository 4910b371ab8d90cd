"""Where the split server and the clients compute (docs/protocols.md, "Devices").

A device setting is ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (``cuda`` when CUDA is available, else
``cpu``); :func:`resolve_device` checks one against this machine. The canonical replica of every
segment stays float32 on the CPU: a non-CPU device computes on a working copy of one segment
(:func:`segment_copy`), and only results cross back. :func:`autocast` is the split server's mixed
precision (``split-server.precision``).
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .options import ConfigError

if TYPE_CHECKING:
    from .models import SplitModel

DEVICE_KEYS = ("split-server.device", "client.device")
"""The run-config keys naming a device."""

DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda when CUDA is available, else cpu)"

PRECISIONS = ("fp32", "bf16", "fp16")
"""``split-server.precision``: float32, or autocast of the server's first-order step to bfloat16 / float16."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(key: str, value: Any) -> str:
    """``value`` checked against this machine, ``auto`` resolved; :class:`ConfigError` naming ``key`` otherwise."""
    if not isinstance(value, str):
        raise ConfigError(key, value, "must be a string")
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return value
    match = _CUDA.fullmatch(value)
    if match is None:
        raise ConfigError(key, value, f"must be {DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise ConfigError(key, value, "CUDA is not available on this machine")
    if match.group(1) is not None:
        count = torch.cuda.device_count()
        if int(match.group(1)) >= count:
            names = "cuda:0" if count == 1 else f"cuda:0..cuda:{count - 1}"
            raise ConfigError(key, value, f"this machine has {count} CUDA device{'' if count == 1 else 's'} ({names})")
    return value


def check_precision(precision: str, device: str, key: str = "split-server.precision") -> None:
    """:class:`ConfigError` unless ``precision`` can run on ``device`` (fp16 needs CUDA; bf16 a GPU that has it)."""
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise ConfigError(key, precision, "fp16 autocast needs a CUDA split-server.device (on the CPU, use bf16)")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(key, precision, f"the CUDA device {device} has no bfloat16 support (use fp16)")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (``fp32``: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def _objects(module: nn.Module) -> Iterator[Any]:
    yield from module.modules()
    yield from module.parameters()
    yield from module.buffers()


def segment_copy(model: SplitModel, segment: str, device: torch.device | str) -> SplitModel:
    """A copy of ``model`` whose ``segment`` (``client`` or ``server``) and top-level buffers are new
    tensors on ``device``.

    What only the other segment reaches (its modules, parameters and buffers) is shared with ``model``,
    not copied, so a client copy holds no server weights and the reverse; anything both segments reach
    (a rotary embedding, a tied frozen head) is copied with ``segment``. Never move or retrain the
    copy's other segment: it is ``model``'s own.
    """
    if segment not in ("client", "server"):
        raise ValueError(f"unknown segment {segment!r}; allowed: client, server")
    kept, other = getattr(model, segment), getattr(model, "server" if segment == "client" else "client")
    reached = {id(obj) for obj in _objects(kept)}
    memo = {id(obj): obj for obj in _objects(other) if id(obj) not in reached}
    twin = copy.deepcopy(model, memo)
    getattr(twin, segment).to(device)
    for name, buffer in list(twin.named_buffers(recurse=False)):
        twin._buffers[name] = buffer.to(device)
    return twin
