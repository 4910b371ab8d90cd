"""Fault injection for robustness testing: replies that fail, and nodes that lie.

Driven by the run config (all off by default):

- ``faults.failure-rate``: each ``train.*`` reply fails with this probability, decided per
  (run seed, round, partition, message type). Half of the failures happen before the node does any
  work (a crashed or unreachable node), half after it has done the work and updated its state (a reply
  lost on the way back), so both kinds of missed update are exercised.
- ``faults.nan-partition``: that partition's replies carry NaN values in the field their reply type
  names as :attr:`~hosfl_flower.protocols.messages.Payload.lie_field` (HO-SFL's probe scalars; the
  smashed activations in protocols without scalar replies).
- ``faults.wrong-count-partition``: that partition's replies carry one value too few there.
- ``faults.byzantine-partition``: that partition falsifies, every round, the fields its reply type
  names as :attr:`~hosfl_flower.protocols.messages.Payload.attack_fields` (what the server
  aggregates), as ``faults.byzantine-mode`` says: ``huge`` replaces every value by ``±1e11`` (inside
  the validation bound), ``flip`` sends the honest update sign-flipped and tripled (scalars ``−3 v``;
  a state ``θ_ref − 3 (θ − θ_ref)`` from the state it was sent; perturbed activations
  ``z − 3 (z̃ − z)``), ``mixed`` is ``huge`` on odd rounds and ``flip`` on even ones.

Query messages (``query.hello``, ``query.sync``) are never faulted, so discovery and the final
synchronisation report the true state of every node.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Error, Message

from .node.store import default_store_dir
from .protocols.messages import Payload, SmashedBatch

INJECTED_ERROR_CODE = 90
"""``Error.code`` of an injected failure."""


def fault_draw(seed: int, server_round: int, partition_id: int, message_type: str) -> float:
    """A uniform number in [0, 1), the same for the same run seed, round, partition and message type."""
    key = [int(seed), int(server_round), int(partition_id), zlib.crc32(message_type.encode())]
    return float(np.random.default_rng(key).random())


def _server_round(message: Message) -> int:
    config = message.content.config_records.get("config")
    value = config.get("server-round") if config is not None else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(message.metadata.group_id) if message.metadata.group_id.isdigit() else 0


def fault_mod(
    config: Mapping[str, Any], message: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Run ``call_next`` unless ``faults.failure-rate`` makes this ``train.*`` reply fail."""
    rate = config["faults.failure-rate"]
    if rate == 0.0 or not message.metadata.message_type.startswith("train"):
        return call_next(message, context)
    partition_id = int(context.node_config.get("partition-id", -1))
    draw = fault_draw(config["seed"], _server_round(message), partition_id, message.metadata.message_type)
    if draw < rate / 2:
        return Message(Error(INJECTED_ERROR_CODE, "injected fault: node failed before the reply"), reply_to=message)
    reply = call_next(message, context)
    if draw < rate:
        return Message(Error(INJECTED_ERROR_CODE, "injected fault: reply lost"), reply_to=message)
    return reply


HUGE = 1e11
"""What a ``huge`` byzantine value is worth (in magnitude): inside the validation bound of 1e12."""


def _sent_path(run_id: str, partition_id: int, keys: Iterable[str]) -> Path:
    """Where a byzantine node keeps the last state it was sent with these keys (the reference a ``flip``
    reflects through): a file beside the node store, so that every process serving the node sees it."""
    digest = hashlib.sha256("\0".join(sorted(keys)).encode()).hexdigest()[:16]
    safe_run = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(run_id))
    return default_store_dir() / "byzantine" / f"{safe_run}-{int(partition_id)}-{digest}.pt"


def _remember(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({k: v.detach().clone() for k, v in state.items()}, temporary)
    os.replace(temporary, path)


def _recall(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return {}


def lie(
    config: Mapping[str, Any], partition_id: int, request: Payload, reply: Payload, server_round: int = 0, run_id: str = "0"
) -> Payload:
    """The reply a lying or byzantine node sends for ``request`` (``faults.nan-partition``,
    ``faults.wrong-count-partition``, ``faults.byzantine-*``); honest nodes' replies are returned as they are."""
    message_type = request.message_type
    if not message_type.startswith("train"):
        return reply
    if partition_id == config["faults.byzantine-partition"]:
        return attack(config["faults.byzantine-mode"], partition_id, request, reply, server_round, run_id)
    if reply.lie_field is None:
        return reply
    if partition_id == config["faults.nan-partition"]:
        how = "nan"
    elif partition_id == config["faults.wrong-count-partition"]:
        how = "short"
    else:
        return reply
    lied: Any = reply  # every Payload is a dataclass
    return dataclasses.replace(lied, **{reply.lie_field: _corrupt(getattr(reply, reply.lie_field), how)})


def _corrupt(value: Any, how: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone().fill_(float("nan")) if how == "nan" else value[:-1]
    if isinstance(value, SmashedBatch):
        return SmashedBatch({**value.smashed, "z": _corrupt(value.smashed["z"], how)}, value.labels)
    if isinstance(value, list) and value and not isinstance(value[0], (int, float)):
        return [_corrupt(item, how) for item in value]
    if isinstance(value, list):
        return [float("nan")] * len(value) if how == "nan" else value[:-1]
    raise TypeError(f"cannot corrupt a {type(value).__name__}")


def attack(mode: str, partition_id: int, request: Payload, reply: Payload, server_round: int, run_id: str = "0") -> Payload:
    """``reply`` with its :attr:`~hosfl_flower.protocols.messages.Payload.attack_fields` falsified (see the module docstring)."""
    for item in dataclasses.fields(request):  # type: ignore[arg-type]  # every Payload is a dataclass
        value = getattr(request, item.name)
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            _remember(_sent_path(run_id, partition_id, value), value)
    if not reply.attack_fields:
        return reply
    how = mode if mode != "mixed" else ("huge" if server_round % 2 else "flip")
    changed: dict[str, Any] = {}
    for name in reply.attack_fields:
        value = getattr(reply, name)
        if isinstance(value, list) and value and all(isinstance(t, torch.Tensor) for t in value):
            # perturbed activations (ZO-SFL's z̃_p, MU-SplitFed's z±_p), flipped about the honest z
            z = reply.batch.smashed["z"]  # type: ignore[attr-defined]
            changed[name] = [_huge(t) if how == "huge" else z - 3.0 * (t - z) for t in value]
        elif isinstance(value, dict):
            sent = _recall(_sent_path(run_id, partition_id, value))
            changed[name] = {k: _falsify(v, how, sent.get(k)) for k, v in value.items()}
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            changed[name] = [math.copysign(HUGE, v) if how == "huge" else -3.0 * v for v in value]
        elif value is not None:
            raise TypeError(f"cannot falsify {type(reply).__name__}.{name} ({type(value).__name__})")
    lied: Any = reply
    return dataclasses.replace(lied, **changed)


def _huge(tensor: torch.Tensor) -> torch.Tensor:
    return torch.where(tensor < 0, -HUGE, HUGE).to(tensor.dtype)


def _falsify(tensor: torch.Tensor, how: str, sent: torch.Tensor | None) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    if how == "huge":
        return _huge(tensor)
    reference = sent if sent is not None and sent.shape == tensor.shape else torch.zeros_like(tensor)
    return reference - 3.0 * (tensor - reference)
