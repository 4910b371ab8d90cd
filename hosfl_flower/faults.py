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

Query messages (``query.hello``, ``query.sync``) are never faulted, so discovery and the final
synchronisation report the true state of every node.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Error, Message

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


def lie(config: Mapping[str, Any], partition_id: int, message_type: str, reply: Payload) -> Payload:
    """The reply a lying node sends (``faults.nan-partition`` / ``faults.wrong-count-partition``)."""
    if not message_type.startswith("train") or reply.lie_field is None:
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
