"""The Message-API ``ClientApp``: a small bridge from Flower messages to :class:`HOSFLClient` calls."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .client import ClientSettings, HOSFLClient, SmashResult
from .config import resolve_run_config
from .faults import build_fault_mod
from .models.aux_head import build_aux_head
from .records import record_to_ledger, record_to_tensors, tensors_to_record
from .task import client_task


def node_partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config (set by simulation, or ``--node-config``)."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as missing:
        raise ValueError(
            f"node config lacks {missing}; start the SuperNode with --node-config "
            "\"partition-id=<i> num-partitions=<n>\""
        ) from None


def make_client(context: Context, overrides: Mapping[str, Any] | None = None) -> HOSFLClient:
    """Build the node's :class:`HOSFLClient` (cheap: model and data are cached per process)."""
    config = resolve_run_config(context.run_config, overrides or {})
    if torch.get_num_threads() != config["torch-threads"]:
        torch.set_num_threads(config["torch-threads"])
    partition_id, num_partitions = node_partition(context)
    task = client_task(config, num_partitions)
    return HOSFLClient(
        task.model,
        task.data.partition(partition_id),
        ClientSettings.from_config(config, partition_id),
        task.initial_client_state,
        context.state,
    )


def _catch_up_args(content: RecordDict) -> dict[str, Any]:
    sync = content.config_records["sync"]
    replacement = content.array_records.get("client-state")
    return {
        "entries": record_to_ledger(content.config_records["ledger"]) if "ledger" in content else [],
        "from_round": int(sync["from-round"]),
        "replacement": record_to_tensors(replacement) if replacement is not None else None,
        "replacement_round": int(sync.get("replacement-round", 0)),
    }


def _smash_content(result: SmashResult, smashed: Mapping[str, torch.Tensor]) -> RecordDict:
    meta = ConfigRecord(
        {
            "num-examples": result.num_examples,
            "fingerprint": result.fingerprint,
            "applied-round": result.applied_round,
            "compute-seconds": result.seconds,
        }
    )
    return RecordDict(
        {"smashed": tensors_to_record(smashed), "labels": tensors_to_record({"y": result.labels}), "meta": meta}
    )


def build_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ``ClientApp`` serving every protocol message; ``overrides`` are run-config values that win.

    The ``faults.*`` keys switch on fault injection (:mod:`hosfl_flower.faults`) for robustness tests.
    """
    app = ClientApp(mods=[build_fault_mod(overrides)])

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        partition_id, num_partitions = node_partition(context)
        client = make_client(context, overrides)
        info = ConfigRecord(
            {
                "partition-id": partition_id,
                "num-partitions": num_partitions,
                "num-examples": len(client.train),
                "applied-round": client.applied_round,
            }
        )
        return Message(RecordDict({"node": info}), reply_to=msg)

    @app.train("smash")
    def smash(msg: Message, context: Context) -> Message:
        client = make_client(context, overrides)
        server_round = int(msg.content.config_records["config"]["server-round"])
        result = client.smash(server_round, **_catch_up_args(msg.content))
        return Message(_smash_content(result, result.smashed), reply_to=msg)

    @app.train("probe")
    def probe(msg: Message, context: Context) -> Message:
        client = make_client(context, overrides)
        seeds = msg.content.config_records["seeds"]
        server_round = int(msg.content.config_records["config"]["server-round"])
        lam = record_to_tensors(msg.content.array_records["activation-grad"])["z"]
        scalars, seconds = client.probe(
            server_round, lam, [int(s) for s in seeds["seeds"]], float(seeds["mu"]),
            str(seeds.get("estimator", "forward")), str(seeds.get("directions", "gaussian")),
        )
        content = RecordDict(
            {"scalars": MetricRecord({"values": scalars}), "meta": MetricRecord({"compute-seconds": seconds})}
        )
        return Message(content, reply_to=msg)

    @app.train("zo_smash")
    def zo_smash(msg: Message, context: Context) -> Message:
        client = make_client(context, overrides)
        seeds = msg.content.config_records["seeds"]
        server_round = int(msg.content.config_records["config"]["server-round"])
        result = client.zo_smash(
            server_round, [int(s) for s in seeds["seeds"]], float(seeds["mu"]), **_catch_up_args(msg.content)
        )
        smashed = {**result.smashed, **{f"z~{p}": z for p, z in enumerate(result.perturbed or [])}}
        return Message(_smash_content(result, smashed), reply_to=msg)

    @app.train("splitfed_smash")
    def splitfed_smash(msg: Message, context: Context) -> Message:
        client = make_client(context, overrides)
        server_round = int(msg.content.config_records["config"]["server-round"])
        weights = msg.content.array_records.get("arrays")
        result = client.splitfed_smash(
            server_round,
            int(msg.content.config_records["step"]["step"]),
            record_to_tensors(weights) if weights is not None else None,
        )
        return Message(_smash_content(result, result.smashed), reply_to=msg)

    @app.train("splitfed_grad")
    def splitfed_grad(msg: Message, context: Context) -> Message:
        client = make_client(context, overrides)
        step = msg.content.config_records["step"]
        server_round = int(msg.content.config_records["config"]["server-round"])
        lam = record_to_tensors(msg.content.array_records["activation-grad"])["z"]
        weights, seconds = client.splitfed_backward(server_round, int(step["step"]), lam, float(step["lr"]))
        records: dict[str, Any] = {"meta": MetricRecord({"compute-seconds": seconds})}
        if bool(step["last"]):
            records["arrays"] = tensors_to_record(weights)
        return Message(RecordDict(records), reply_to=msg)

    @app.train("heron")
    def heron(msg: Message, context: Context) -> Message:
        client = make_client(context, overrides)
        settings = msg.content.config_records["heron"]
        server_round = int(msg.content.config_records["config"]["server-round"])
        client_weights = record_to_tensors(msg.content.array_records["arrays"])
        head_weights = record_to_tensors(msg.content.array_records["aux-head"])
        client.model.load_client_state(client_weights)
        probe = client.train.take(torch.arange(1)).inputs
        with torch.no_grad():
            z = client.model.smash(probe)["z"]
        head = build_aux_head(str(settings["head"]), z, client.model.num_classes, client.settings.seed)
        head.load_state_dict(head_weights)
        kept, seconds = client.heron_train(
            server_round, client_weights, head, int(settings["local-steps"]), int(settings["upload-every"]),
            float(settings["mu"]), float(settings["lr"]),
        )
        records: dict[str, Any] = {
            "arrays": tensors_to_record(client.model.client_state()),
            "aux-head": tensors_to_record(head.state_dict()),
            "meta": ConfigRecord(
                {"steps": [step for step, _, _ in kept], "num-examples": len(client.train), "compute-seconds": seconds}
            ),
        }
        for index, (_, smashed, labels) in enumerate(kept):
            records[f"smashed.{index}"] = tensors_to_record(smashed)
            records[f"labels.{index}"] = tensors_to_record({"y": labels})
        return Message(RecordDict(records), reply_to=msg)

    @app.query("sync")
    def sync(msg: Message, context: Context) -> Message:
        client = make_client(context, overrides)
        fp, applied = client.sync(**_catch_up_args(msg.content))
        return Message(RecordDict({"meta": ConfigRecord({"fingerprint": fp, "applied-round": applied})}), reply_to=msg)

    @app.train()
    def fit(msg: Message, context: Context) -> Message:
        client = make_client(context, overrides)
        config = dict(msg.content.config_records.get("config", ConfigRecord()))
        arrays, num_examples, metrics = client.fit(msg.content.array_records["arrays"].to_numpy_ndarrays(), config)
        keys = list(msg.content.array_records["arrays"].keys())
        record = ArrayRecord({key: Array(array) for key, array in zip(keys, arrays)})
        return Message(
            RecordDict({"arrays": record, "metrics": MetricRecord({**metrics, "num-examples": num_examples})}),
            reply_to=msg,
        )

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        client = make_client(context, overrides)
        config = dict(msg.content.config_records.get("config", ConfigRecord()))
        loss, num_examples, metrics = client.evaluate(msg.content.array_records["arrays"].to_numpy_ndarrays(), config)
        return Message(
            RecordDict({"metrics": MetricRecord({**metrics, "loss": loss, "num-examples": num_examples})}), reply_to=msg
        )

    return app
