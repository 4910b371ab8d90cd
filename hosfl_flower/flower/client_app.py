"""The ``ClientApp``: routes each message to the handler of its request type, on the node's
:class:`~hosfl_flower.node.client.HOSFLClient` (or a user's subclass, ``client_class``).

Routing looks the message type up in the protocol registry when the message arrives, so a protocol
registered after the app was built is served too. The ``faults.*`` keys switch on fault injection
(:mod:`hosfl_flower.faults`) for robustness tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..config import resolve_run_config
from ..faults import fault_mod, lie
from ..node.client import ClientSettings, HOSFLClient
from ..node.store import NODE_STORE
from ..protocols.messages import HelloReply, HelloRequest, Payload
from ..protocols.registry import request_type
from ..task import client_task
from .link import server_round_of


def node_partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config (set by simulation, or ``--node-config``)."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as missing:
        raise ValueError(
            f'node config lacks {missing}; start the SuperNode with --node-config "partition-id=<i> num-partitions=<n>"'
        ) from None


def make_client(
    context: Context, overrides: Mapping[str, Any] | None = None, client_class: type[HOSFLClient] = HOSFLClient
) -> HOSFLClient:
    """The node's client (cheap: model and data are cached per process)."""
    config = resolve_run_config(context.run_config, overrides or {})
    if torch.get_num_threads() != config["torch-threads"]:
        torch.set_num_threads(config["torch-threads"])
    partition_id, num_partitions = node_partition(context)
    task = client_task(config, num_partitions)
    return client_class(
        task.model,
        task.data.partition(partition_id),
        ClientSettings.from_config(config, partition_id, num_partitions),
        task.initial_client_state,
        context.state,
        NODE_STORE,
        str(context.run_id),
        int(context.node_id),
    )


def hello(client: HOSFLClient, request: HelloRequest, server_round: int) -> HelloReply:
    """Who this node is: its partition, its number of examples, the round its ``θ_c`` is at."""
    partition_id = client.settings.partition_id
    return HelloReply(partition_id, client.settings.num_partitions, len(client.train), client.applied_round)


class ProtocolClientApp(ClientApp):
    """A ``ClientApp`` serving every registered protocol's requests (and Flower's own ``train`` /
    ``evaluate`` messages, through the NumPyClient methods)."""

    def __init__(self, overrides: Mapping[str, Any] | None = None, client_class: type[HOSFLClient] = HOSFLClient) -> None:
        super().__init__()
        self.overrides = dict(overrides or {})
        self.client_class = client_class

    def __call__(self, message: Message, context: Context) -> Message:
        with self._lifespan(context):
            config = resolve_run_config(context.run_config, self.overrides)
            return fault_mod(config, message, context, self.serve)

    def serve(self, message: Message, context: Context) -> Message:
        """Decode the request, run its handler on the node's client, encode the reply."""
        client = make_client(context, self.overrides, self.client_class)
        kind = message.metadata.message_type
        if kind in ("train", "evaluate"):
            return numpy_client_reply(client, message)
        request_class = HelloRequest if kind == "query.hello" else request_type(kind)
        if request_class is None:
            raise ValueError(f"no protocol handles message type {kind!r}")
        request = request_class.from_record(message.content)
        round_ = server_round_of(message.content)
        reply: Payload
        if isinstance(request, HelloRequest):
            reply = hello(client, request, round_)
        else:
            config = resolve_run_config(context.run_config, self.overrides)
            reply = lie(config, client.settings.partition_id, request, client.handle(request, round_), round_, client.run_id)
        return Message(reply.to_record(), reply_to=message)


def numpy_client_reply(client: HOSFLClient, message: Message) -> Message:
    """Flower's ``train`` / ``evaluate`` messages (``arrays`` + ``config``) served by the NumPyClient methods."""
    config = dict(message.content.config_records.get("config", ConfigRecord()))
    arrays = message.content.array_records["arrays"]
    if message.metadata.message_type == "train":
        weights, num_examples, metrics = client.fit(arrays.to_numpy_ndarrays(), config)
        record = ArrayRecord({key: Array(array) for key, array in zip(arrays.keys(), weights)})
        content: dict[str, Any] = {"arrays": record, "metrics": MetricRecord({**metrics, "num-examples": num_examples})}
    else:
        loss, num_examples, metrics = client.evaluate(arrays.to_numpy_ndarrays(), config)
        content = {"metrics": MetricRecord({**metrics, "loss": loss, "num-examples": num_examples})}
    return Message(RecordDict(content), reply_to=message)


def build_client_app(overrides: Mapping[str, Any] | None = None, client_class: type[HOSFLClient] = HOSFLClient) -> ClientApp:
    """A ``ClientApp`` serving every protocol; ``overrides`` are run-config values that win, and
    ``client_class`` (a :class:`HOSFLClient` subclass) is what runs on every node."""
    if not (isinstance(client_class, type) and issubclass(client_class, HOSFLClient)):
        raise TypeError(f"client_class must be a subclass of HOSFLClient, got {client_class!r}")
    return ProtocolClientApp(overrides, client_class)
