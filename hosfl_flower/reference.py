"""Any registered protocol as a plain in-process loop, with no Flower: the check of the Flower run.

It drives the protocol's own server part and its nodes' handlers, exactly as the Flower strategy and
ClientApp do, but hands each typed request to the node's client directly: through the same records and
validation, without messages, the simulation engine and ``Context``. A Flower run that ends
``torch.equal`` to this loop therefore shows that the transport moved every number without loss.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import RecordDict

from .config import resolve_run_config
from .evaluation import evaluate_model
from .faults import lie
from .models import SplitModel
from .node.client import ClientSettings, HOSFLClient
from .node.store import WeightStore
from .protocols.base import Check, Link, NodeInfo, ProtocolServer, RunSettings, ServerHooks
from .protocols.messages import ModelSpec, Payload, ReplyError
from .protocols.registry import get_protocol
from .schedule import RoundSchedule
from .split_server import SplitServer, sync_server_segment
from .task import client_task, server_model_and_test

_RUNS = itertools.count()


@dataclass
class ReferenceResult:
    """The server's final model, its protocol server part, and per-round metrics."""

    model: SplitModel
    protocol: ProtocolServer
    history: list[dict[str, Any]] = field(default_factory=list)
    clients: dict[int, HOSFLClient] = field(default_factory=dict)

    @property
    def ledger(self):
        """The ledger of a ledger protocol (HO-SFL, ZO-SFL, frozen client)."""
        return self.protocol.sync.ledger


@dataclass
class RoundTrace:
    """What :func:`run_reference` shows an observer after each round."""

    round: int
    model: SplitModel
    metrics: Mapping[str, Any]


class InProcessLink(Link):
    """A link that calls each node's handler directly, through records as the Flower link does: the
    request is written and read back (``to_record`` / ``from_record``) before the handler runs, and the
    reply is written and read back with its request and ``spec``. A handler that raises counts as
    ``error``, a reply that fails validation under its reason (any other exception of a decoding as
    ``malformed``), as :class:`~hosfl_flower.flower.link.GridLink` counts them."""

    def __init__(
        self,
        name: str,
        clients: Mapping[int, HOSFLClient],
        server_round: int,
        config: Mapping[str, Any] | None = None,
        spec: ModelSpec | None = None,
    ) -> None:
        super().__init__(name)
        self.clients, self.server_round, self.config, self.spec = clients, server_round, config, spec

    def exchange(self, requests: Sequence[tuple[NodeInfo, Payload]], check: Check | None = None) -> dict[NodeInfo, Any]:
        kept: dict[NodeInfo, Any] = {}
        for node, request in requests:
            reply = self.call(node, request)
            if reply is not None and self.keep(node, reply, check):
                kept[node] = reply
        if requests:
            self.account.round_trips += 1
        return kept

    def call(self, node: NodeInfo, request: Payload) -> Any:
        """The node's validated reply to ``request``, or ``None`` after counting why it was rejected."""
        expected = type(request).reply_type
        if expected is None:
            raise TypeError(f"{type(request).__name__} declares no reply_type")
        client = self.clients[node.node_id]
        try:
            reply = client.handle(type(request).from_record(request.to_record()), self.server_round)
            if self.config is not None:  # the run's fault injection, as the ClientApp applies it
                reply = lie(self.config, client.settings.partition_id, request, reply, self.server_round, client.run_id)
            content = reply.to_record()
        except Exception as error:  # noqa: BLE001 - a node that fails answers with an error, as in Flower
            self.reject("error", node, f"{type(error).__name__}: {error}")
            return None
        try:
            return expected.from_record(content, request, self.spec)
        except ReplyError as error:
            self.reject(error.reason, node, str(error))
        except Exception as error:  # noqa: BLE001 - whatever a node sends, a bad reply is only rejected
            self.reject("malformed", node, f"{type(error).__name__}: {error}")
        return None


def build_reference_nodes(
    cfg: Mapping[str, Any], num_partitions: int, client_class: type[HOSFLClient] = HOSFLClient
) -> dict[int, HOSFLClient]:
    """One client per partition (node id = partition id), sharing one model as a Flower process's nodes do."""
    task = client_task(cfg, num_partitions)
    store, run_id = WeightStore(None), f"reference-{os.getpid()}-{next(_RUNS)}"
    return {
        pid: client_class(
            task.model,
            task.data.partition(pid),
            ClientSettings.from_config(cfg, pid, num_partitions),
            task.initial_client_state,
            RecordDict(),
            store,
            run_id,
            pid,
        )
        for pid in range(num_partitions)
    }


def run_reference(
    run_config: Mapping[str, Any],
    num_partitions: int,
    observe: Callable[[RoundTrace], None] | None = None,
    hooks: ServerHooks | None = None,
    client_class: type[HOSFLClient] = HOSFLClient,
) -> ReferenceResult:
    """Run the run config's protocol for ``num-server-rounds`` rounds over ``num_partitions`` nodes in
    this process; ``observe`` (for analysis) is called after each round and must not change the model."""
    cfg = resolve_run_config(run_config)
    torch.set_num_threads(cfg["torch-threads"])
    spec = get_protocol(cfg["strategy"])
    model, test = server_model_and_test(cfg)
    run, schedule = RunSettings.from_config(cfg), RoundSchedule(cfg["seed"])
    server = SplitServer(
        model,
        optimizer=cfg["server.optimizer"],
        lr=cfg["server.lr"],
        momentum=cfg["server.momentum"],
        weight_decay=cfg["server.weight-decay"],
        device=cfg["split-server.device"],
        precision=cfg["split-server.precision"],
    )
    example = test.take(torch.arange(1))
    model_spec = ModelSpec.of(model, example.inputs, example.labels)
    protocol = spec.server(model, model_spec, run, spec.settings.from_config(cfg), server, schedule, hooks)
    clients = build_reference_nodes(cfg, num_partitions, client_class)
    nodes = [NodeInfo(pid, pid, len(client.train)) for pid, client in clients.items()]
    for node in nodes:
        protocol.node_discovered(node, 0)
    result = ReferenceResult(model, protocol, clients=clients)
    for rnd in range(1, run.num_rounds + 1):
        picked = schedule.sample([n.partition_id for n in nodes], run.clients_per_round)
        link = InProcessLink(spec.name, clients, rnd, cfg, spec=model_spec)
        row: dict[str, Any] = {"round": rnd, **protocol.run_round(rnd, [nodes[p] for p in picked], link)}
        if rnd % cfg["eval-every"] == 0 or rnd == run.num_rounds:
            sync_server_segment(server, model)
            row["loss"], row["accuracy"] = evaluate_model(model, test, cfg["eval-batch-size"])
        result.history.append(row)
        if observe is not None:
            sync_server_segment(server, model)
            observe(RoundTrace(rnd, model, row))
    protocol.finish(nodes, InProcessLink(spec.name, clients, 0, spec=model_spec))
    sync_server_segment(server, model)
    return result
