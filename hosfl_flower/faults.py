"""Fault injection for robustness testing: a Flower client mod that makes protocol replies fail or lie.

Driven by the run config (all off by default):

- ``faults.failure-rate``: each ``train.*`` reply fails with this probability, decided per
  (run seed, round, partition, message type). Half of the failures happen before the node does any
  work (a crashed or unreachable node), half after it has done the work and updated its state (a reply
  lost on the way back), so both kinds of missed update are exercised.
- ``faults.nan-partition``: that partition's replies carry NaN values (HO-SFL's probe scalars; the
  smashed activations in protocols without scalar replies).
- ``faults.wrong-count-partition``: that partition's replies carry one value too few.

Query messages (``query.hello``, ``query.sync``) are never faulted, so discovery and the final
synchronisation report the true state of every node.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, MetricRecord

from .config import resolve_run_config
from .records import record_to_tensors, tensors_to_record

INJECTED_ERROR_CODE = 90
"""``Error.code`` of an injected failure."""


def fault_draw(seed: int, server_round: int, partition_id: int, message_type: str) -> float:
    """A uniform number in [0, 1), the same for the same run seed, round, partition and message type."""
    key = [int(seed), int(server_round), int(partition_id), zlib.crc32(message_type.encode())]
    return float(np.random.default_rng(key).random())


def _server_round(message: Message) -> int:
    config = message.content.config_records.get("config")
    if config is not None and "server-round" in config:
        return int(config["server-round"])
    return int(message.metadata.group_id) if message.metadata.group_id.isdigit() else 0


def _corrupt(reply: Message, how: str) -> Message:
    """Replace the reply's scalars by NaN or by one value too few; in a protocol without scalar replies,
    its smashed ``z`` (HO-SFL's ``train.smash`` is left alone: its node lies in the ``train.probe`` scalars)."""
    content = reply.content
    if reply.metadata.message_type == "train.smash":
        return reply
    scalars = content.metric_records.get("scalars")
    if scalars is not None and "values" in scalars:
        values = scalars["values"]
        values = [values] if isinstance(values, (int, float)) else list(values)
        content["scalars"] = MetricRecord({"values": [float("nan")] * len(values) if how == "nan" else values[:-1]})
        return reply
    for name in [name for name in content.array_records if name.split(".")[0] == "smashed"]:
        tensors = record_to_tensors(content.array_records[name])
        if "z" in tensors:
            tensors["z"] = tensors["z"].clone().fill_(float("nan")) if how == "nan" else tensors["z"][:-1]
            content[name] = tensors_to_record(tensors)
    return reply


def build_fault_mod(overrides: Mapping[str, Any] | None = None) -> Callable[[Message, Context, Callable], Message]:
    """The mod a ``ClientApp`` runs around every handler; a no-op while every ``faults.*`` key is off."""

    def fault_mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        config = resolve_run_config(context.run_config, overrides or {})
        rate = config["faults.failure-rate"]
        nan_partition, wrong_partition = config["faults.nan-partition"], config["faults.wrong-count-partition"]
        if not message.metadata.message_type.startswith("train") or (rate == 0.0 and nan_partition < 0 and wrong_partition < 0):
            return call_next(message, context)
        partition_id = int(context.node_config.get("partition-id", -1))
        draw = fault_draw(config["seed"], _server_round(message), partition_id, message.metadata.message_type)
        failed = draw < rate
        if failed and draw < rate / 2:
            return Message(Error(INJECTED_ERROR_CODE, "injected fault: node failed before the reply"), reply_to=message)
        reply = call_next(message, context)
        if failed:
            return Message(Error(INJECTED_ERROR_CODE, "injected fault: reply lost"), reply_to=message)
        if reply.has_error():
            return reply
        if partition_id == nan_partition:
            return _corrupt(reply, "nan")
        if partition_id == wrong_partition:
            return _corrupt(reply, "short")
        return reply

    return fault_mod
