"""What every split strategy shares: node discovery and sampling, message exchange with accounting,
reply validation, central evaluation, the per-round log line, the results file and the ``Result``.

A protocol subclass implements :meth:`SplitStrategy.run_round` (and Flower's ``configure_train`` /
``aggregate_train``) and nothing else.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..accounting import RoundAccount
from ..checkpoint import CheckpointError, check_same_run, check_tensors, checkpoint_path, read_checkpoint, save_checkpoint
from ..config import ConfigError, resolve_run_config
from ..data import Examples
from ..evaluation import evaluate_model
from ..models import SplitModel
from ..recording import RunRecorder, numeric
from ..records import record_to_tensors, tensors_to_record
from ..schedule import RoundSchedule
from ..split_server import RaySplitServer, SplitServer, build_split_server


@dataclass(frozen=True)
class NodeInfo:
    """A node as the strategy knows it: Flower node id, its data partition, its number of examples."""

    node_id: int
    partition_id: int
    num_examples: int


def error_text(reply: Message) -> str:
    """The last line of an error reply's reason."""
    reason = reply.error.reason.strip() if reply.error.reason else ""
    return reason.splitlines()[-1] if reason else f"error code {reply.error.code}"


def meta_seconds(reply: Message) -> float:
    """The ``compute-seconds`` a client reported in its ``meta`` (or ``metrics``) record; 0 when absent."""
    if reply.has_error():
        return 0.0
    for records in (reply.content.metric_records, reply.content.config_records):
        for name in ("meta", "metrics"):
            meta = records.get(name)
            if meta is not None and isinstance(meta.get("compute-seconds"), (int, float)):
                return float(meta["compute-seconds"])
    return 0.0


class ReplyError(Exception):
    """A reply failed validation; ``reason`` is the short name it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def require_array(content: RecordDict, record: str, key: str) -> torch.Tensor:
    """``content[record][key]`` as a tensor, or :class:`ReplyError` ``malformed``."""
    arrays = content.array_records.get(record)
    if arrays is None or key not in arrays:
        raise ReplyError("malformed", f"missing {record}.{key}")
    try:
        return record_to_tensors(ArrayRecord({key: arrays[key]}))[key]
    except Exception as error:  # noqa: BLE001 - any decoding failure is a malformed reply
        raise ReplyError("malformed", f"{record}.{key} does not decode: {error}") from None


def require_finite(tensor: torch.Tensor, what: str, bound: float = 1e12) -> None:
    """Raise :class:`ReplyError` unless every value is finite and within ``bound``."""
    if tensor.is_floating_point():
        if not bool(torch.isfinite(tensor).all()):
            raise ReplyError("non-finite", what)
        if tensor.numel() and float(tensor.abs().max()) > bound:
            raise ReplyError("out-of-range", what)


class SplitStrategy(Strategy):
    """Base of the split strategies: a Flower Message-API ``Strategy`` that owns a :class:`SplitModel`.

    Hooks a subclass may override: :meth:`sample_nodes`, :meth:`aggregation_weights`,
    :meth:`evaluate`. The model, the split server and the schedule are built from the run config
    unless passed in.
    """

    name = "split"

    def __init__(
        self,
        model: SplitModel,
        test: Examples,
        run_config: Mapping[str, Any] | None = None,
        split_server: SplitServer | RaySplitServer | None = None,
    ) -> None:
        self.cfg = resolve_run_config(run_config or {})
        self.model = model
        self.test = test
        self.schedule = RoundSchedule(self.cfg["seed"])
        self._split_server = split_server
        self.nodes: dict[int, NodeInfo] = {}
        self.history: list[dict[str, Any]] = []
        self.evaluations: dict[int, dict[str, float]] = {}
        self.skipped_in_a_row = 0
        self.rejections: Counter = Counter()
        self.results_dir = Path(self.cfg["results-dir"]) if self.cfg["results-dir"] else None
        self.expected_z_shape = self._smashed_shape()
        self.timeout = float(self.cfg["round-timeout"])
        self.train_config = ConfigRecord()

    # ------------------------------------------------------------------ hooks
    def sample_nodes(self, server_round: int, nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
        """The nodes that take part in ``server_round``: ``clients-per-round`` of them, drawn by
        partition id with the run's seeded schedule (so simulation, deployment and the reference
        loop agree)."""
        by_partition = {n.partition_id: n for n in nodes}
        picked = self.schedule.sample(list(by_partition), self.cfg["clients-per-round"])
        return [by_partition[p] for p in picked]

    def aggregation_weights(self, server_round: int, num_examples: Sequence[int]) -> list[float]:
        """Weights ``w_n`` of the kept replies (default: share of examples)."""
        total = sum(num_examples)
        return [n / total for n in num_examples]

    def evaluate(self, server_round: int) -> dict[str, float]:
        """Central evaluation of the current model on the held-out test split."""
        self.sync_server_weights()
        loss, accuracy = evaluate_model(self.model, self.test, self.cfg["eval-batch-size"])
        return {"loss": loss, "accuracy": accuracy}

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def run_round(self, grid: Grid, server_round: int, account: RoundAccount) -> dict[str, Any]:
        """Run one round's exchanges and updates; return the round's training metrics."""

    # ------------------------------------------------------------------ Flower Strategy API
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Split strategies evaluate centrally: no federated evaluation messages."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def summary(self) -> None:
        """Log the strategy and its settings."""
        keys = ("num-server-rounds", "clients-per-round", "batch-size", "model", "cut-layer", "partitioner", "seed")
        log(INFO, "%s: %s", type(self).__name__, ", ".join(f"{k}={self.cfg[k]}" for k in keys))

    @property
    def split_server(self) -> SplitServer | RaySplitServer:
        """The split server (built on first use, so a Ray placement waits for Flower's Ray)."""
        if self._split_server is None:
            self._split_server = build_split_server(
                self.model,
                self.cfg["split-server.placement"],
                optimizer=self.cfg["server.optimizer"],
                lr=self.cfg["server.lr"],
                momentum=self.cfg["server.momentum"],
                weight_decay=self.cfg["server.weight-decay"],
            )
        return self._split_server

    def sync_server_weights(self) -> None:
        """Copy ``θ_s`` from a split server that does not share this process's model (Ray placement)."""
        if isinstance(self._split_server, RaySplitServer):
            self.model.server.load_state_dict(self._split_server.server_weights())

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run the federation and return Flower's ``Result`` (final whole-model arrays and metrics).

        ``initial_arrays`` (whole-model state dict) replaces the initial weights; ``num_rounds`` and
        ``timeout`` default to ``num-server-rounds`` and ``round-timeout``; ``evaluate_fn`` is called
        after central evaluation with the whole model's arrays, like Flower's own strategies do.
        """
        if initial_arrays is not None and len(initial_arrays):
            self.model.load_state_dict(record_to_tensors(initial_arrays))
        num_rounds = num_rounds or self.cfg["num-server-rounds"]
        self.timeout = float(timeout or self.cfg["round-timeout"])
        self.train_config = train_config or ConfigRecord()
        self.summary()
        result = Result()
        recorder = RunRecorder(self.name, self.results_dir, num_rounds)
        first_round = 1
        if self.cfg["resume"]:
            first_round = self.resume() + 1
            recorder.restore(self.history)
            for row in self.history:
                result.train_metrics_clientapp[row["round"]] = MetricRecord(numeric(row))
        self.discover_nodes(grid)
        _ = self.split_server
        if first_round == 1:
            self.evaluations[0] = self._evaluate(0, evaluate_fn)
        for server_round in range(first_round, num_rounds + 1):
            account = RoundAccount()
            started = time.perf_counter()
            self.rejections = Counter()
            metrics = self.run_round(grid, server_round, account)
            row: dict[str, Any] = {"round": server_round, **metrics, **account.as_metrics()}
            row.update({f"rejected.{reason}": count for reason, count in sorted(self.rejections.items())})
            if server_round % self.cfg["eval-every"] == 0 or server_round == num_rounds:
                self.evaluations[server_round] = self._evaluate(server_round, evaluate_fn)
                row.update(self.evaluations[server_round])
            row["seconds"] = time.perf_counter() - started
            result.train_metrics_clientapp[server_round] = MetricRecord(numeric(row))
            self.history.append(row)
            recorder.record(row)
            self.check_progress(row)
            if self.cfg["checkpoint-every"] and server_round % self.cfg["checkpoint-every"] == 0:
                self.save_checkpoint(server_round)
        result.evaluate_metrics_serverapp.update({r: MetricRecord(m) for r, m in sorted(self.evaluations.items())})
        final = self.finish(grid)
        self.sync_server_weights()
        result.arrays = tensors_to_record(self.model.state_dict())
        recorder.finish(self.model, self.cfg, final)
        if isinstance(self._split_server, RaySplitServer):
            self._split_server.close()
        return result

    # ------------------------------------------------------------------ faults and progress
    def enough_replies(self, kept: Sequence[Any], exchange: str, metrics: dict[str, Any]) -> bool:
        """Whether ``kept`` meets ``min-replies``; if not, mark the round skipped (the caller leaves the model alone)."""
        if len(kept) >= self.cfg["min-replies"]:
            return True
        metrics["skipped"] = 1
        log(WARNING, "[%s] round skipped: %d valid %s replies, min-replies=%d", self.name, len(kept), exchange, self.cfg["min-replies"])
        return False

    def check_progress(self, row: Mapping[str, Any]) -> None:
        """Stop with an error after ``max-skipped-rounds`` skipped rounds in a row."""
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if row.get("skipped") else 0
        if self.skipped_in_a_row >= self.cfg["max-skipped-rounds"]:
            rejected = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in row.items() if k.startswith("rejected.")) or "none"
            raise RuntimeError(
                f"[{self.name}] no progress: rounds {row['round'] - self.skipped_in_a_row + 1}-{row['round']} were all "
                f"skipped with fewer than min-replies={self.cfg['min-replies']} valid replies "
                f"(rejected in round {row['round']}: {rejected})"
            )

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resumed run needs from this strategy (subclasses add their own parts)."""
        return {
            "server": self.split_server.state(),
            "client": {k: v.detach().clone() for k, v in self.model.client_state().items()},
            "schedule": self.schedule.state(),
            "torch-rng": torch.get_rng_state(),
            "history": [dict(row) for row in self.history],
            "evaluations": {int(r): dict(m) for r, m in self.evaluations.items()},
            "skipped-in-a-row": self.skipped_in_a_row,
        }

    def check_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Raise :class:`CheckpointError` unless ``state`` fits this strategy and model (nothing is loaded)."""
        missing = [key for key in self.checkpoint_state_keys() if key not in state]
        if missing:
            raise CheckpointError(f"checkpoint lacks {', '.join(missing)}")
        check_tensors("client segment", state["client"], self.model.client_state())
        check_tensors("server segment", state["server"].get("weights"), self.model.server.state_dict())
        groups = state["server"].get("optimizer", {}).get("param_groups", [])
        if sum(len(g["params"]) for g in groups) != len(self.model.server_parameters()):
            raise CheckpointError("checkpoint's server optimizer does not fit this model's server segment")

    def checkpoint_state_keys(self) -> tuple[str, ...]:
        return ("server", "client", "schedule", "torch-rng", "history", "evaluations", "skipped-in-a-row")

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Load a checked :meth:`checkpoint_state` (subclasses load their own parts)."""
        self.split_server.load_state(state["server"])
        self.sync_server_weights()
        self.model.load_client_state(state["client"])
        self.schedule.set_state(state["schedule"])
        torch.set_rng_state(state["torch-rng"])
        self.history = [dict(row) for row in state["history"]]
        self.evaluations = {int(r): dict(m) for r, m in state["evaluations"].items()}
        self.skipped_in_a_row = int(state["skipped-in-a-row"])

    def save_checkpoint(self, server_round: int) -> None:
        """Write the checkpoint of ``server_round`` to ``checkpoint-dir`` (atomically)."""
        path = save_checkpoint(self.cfg["checkpoint-dir"], server_round, self.cfg, self.checkpoint_state())
        log(INFO, "[%s] checkpoint of round %d written to %s", self.name, server_round, path)

    def resume(self) -> int:
        """Load the checkpoint in ``checkpoint-dir`` whole or not at all; return its round.

        A missing, corrupt or truncated file, a different run config or a state that does not fit
        the model raises :class:`CheckpointError` before anything is changed.
        """
        directory = self.cfg["checkpoint-dir"]
        content = read_checkpoint(directory)
        check_same_run(checkpoint_path(directory), content["config"], self.cfg)
        saved_round = int(content["round"])
        if saved_round >= self.cfg["num-server-rounds"]:
            raise CheckpointError(
                f"checkpoint {checkpoint_path(directory)} is of round {saved_round}: nothing left to run "
                f"with num-server-rounds={self.cfg['num-server-rounds']}"
            )
        self.check_checkpoint_state(content["state"])
        before = self.checkpoint_state()
        try:
            self.load_checkpoint_state(content["state"])
        except Exception as error:  # noqa: BLE001 - put everything back, then refuse
            self.load_checkpoint_state(before)
            raise CheckpointError(f"checkpoint {checkpoint_path(directory)} does not load: {error}") from error
        log(INFO, "[%s] resumed from the checkpoint of round %d in %s", self.name, saved_round, directory)
        return saved_round

    def finish(self, grid: Grid) -> dict[str, Any]:
        """Called once after the last round (e.g. a final sync); returns summary metrics."""
        return {}

    # ------------------------------------------------------------------ machinery
    def exchange(self, grid: Grid, messages: Sequence[Message], account: RoundAccount) -> list[Message]:
        """Send ``messages``, wait for the replies, and account both directions."""
        if not messages:
            return []
        for message in messages:
            account.count(message, "down")
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        for reply in replies:
            account.count(reply, "up")
        account.round_trips += 1
        return replies

    def collect(
        self, replies: Iterable[Message], nodes: Sequence[NodeInfo], validate: Callable[[Message, NodeInfo], Any]
    ) -> list[Any]:
        """Validate each node's reply in ``nodes`` order; count and drop what is missing or fails."""
        by_node = self.reply_by_node(replies)
        kept = []
        for node in nodes:
            reply = by_node.get(node.node_id)
            if reply is None:
                self.reject("no-reply", node)
                continue
            try:
                kept.append(validate(reply, node))
            except ReplyError as error:
                self.reject(error.reason, node, str(error))
        return kept

    def reply_by_node(self, replies: Iterable[Message]) -> dict[int, Message]:
        """Replies keyed by the node they came from."""
        return {reply.metadata.src_node_id: reply for reply in replies}

    def reject(self, reason: str, node: NodeInfo | None = None, detail: str = "") -> None:
        """Count a rejected reply by reason (and log it)."""
        self.rejections[reason] += 1
        where = f" from partition {node.partition_id}" if node is not None else ""
        log(WARNING, "[%s] reply rejected%s: %s%s", self.name, where, reason, f" ({detail})" if detail else "")

    def message(self, node: NodeInfo, message_type: str, server_round: int, records: Mapping[str, Any]) -> Message:
        """A message to ``node`` carrying ``records`` plus a ``config`` record with the round."""
        config = ConfigRecord({**dict(self.train_config), "server-round": server_round})
        content = RecordDict({**records, "config": config})
        return Message(content, dst_node_id=node.node_id, message_type=message_type, group_id=str(server_round))

    def parse_smashed(self, content: RecordDict, suffix: str = "") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Decode and check the ``smashed{suffix}`` and ``labels{suffix}`` records of a reply.

        Checks dtype, shapes (against one held-out example's ``z``), finiteness and label range;
        raises :class:`ReplyError` naming what is wrong. Extra arrays in ``smashed`` (companions,
        perturbed activations) are returned alongside ``z``.
        """
        z = require_array(content, "smashed" + suffix, "z")
        labels = require_array(content, "labels" + suffix, "y")
        if z.dtype != torch.float32:
            raise ReplyError("wrong-dtype", f"z is {z.dtype}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise ReplyError("wrong-dtype", f"labels are {labels.dtype}")
        if z.dim() == 0 or labels.dim() == 0 or z.shape[0] != labels.shape[0] or labels.shape[0] == 0:
            raise ReplyError("wrong-shape", f"z {tuple(z.shape)} for labels {tuple(labels.shape)}")
        if self.expected_z_shape is not None and tuple(z.shape[1:]) != self.expected_z_shape:
            raise ReplyError("wrong-shape", f"z {tuple(z.shape[1:])}, expected {self.expected_z_shape}")
        valid = (labels >= 0) | (labels == -100)
        if not bool(valid.all()) or int(labels.max()) >= self.model.num_classes:
            raise ReplyError("out-of-range", "labels")
        require_finite(z, "z")
        smashed = {"z": z}
        for key in content.array_records["smashed" + suffix]:
            if key != "z":
                smashed[key] = require_array(content, "smashed" + suffix, key)
                if smashed[key].shape[:1] != z.shape[:1]:
                    raise ReplyError("wrong-shape", f"{key} {tuple(smashed[key].shape)}")
                require_finite(smashed[key], key)
        return smashed, labels.long()

    def discover_nodes(self, grid: Grid) -> None:
        """Wait for enough nodes, then ask every new node for its partition (``query.hello``)."""
        wanted = self.cfg["min-nodes"] or self.cfg["clients-per-round"]
        deadline = time.monotonic() + self.timeout
        last_count, stable_since = -1, time.monotonic()
        while True:
            node_ids = sorted(grid.get_node_ids())
            if len(node_ids) >= wanted:
                break
            if len(node_ids) != last_count:
                last_count, stable_since = len(node_ids), time.monotonic()
            if not self.cfg["min-nodes"] and node_ids and time.monotonic() - stable_since > 15:
                raise ConfigError(
                    "clients-per-round", self.cfg["clients-per-round"], f"must be <= the number of nodes ({len(node_ids)})"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(node_ids)} of the {wanted} nodes needed connected within {self.timeout:.0f}s")
            time.sleep(0.2)
        new = [nid for nid in node_ids if nid not in self.nodes]
        if not new:
            return
        messages = [
            Message(RecordDict({}), dst_node_id=nid, message_type="query.hello", group_id="hello") for nid in new
        ]
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                self.reject("error", detail=error_text(reply))
                continue
            info = reply.content.config_records["node"]
            node = NodeInfo(reply.metadata.src_node_id, int(info["partition-id"]), int(info["num-examples"]))
            clash = [n for n in self.nodes.values() if n.partition_id == node.partition_id]
            if clash:
                raise RuntimeError(f"nodes {clash[0].node_id} and {node.node_id} both hold partition {node.partition_id}")
            self.nodes[node.node_id] = node
            self.node_discovered(node, info)
        if len(self.nodes) < self.cfg["clients-per-round"]:
            raise ConfigError(
                "clients-per-round", self.cfg["clients-per-round"], f"must be <= the number of nodes ({len(self.nodes)})"
            )
        log(INFO, "[%s] %d nodes, partitions %s", self.name, len(self.nodes), sorted(n.partition_id for n in self.nodes.values()))

    def node_discovered(self, node: NodeInfo, info: ConfigRecord) -> None:
        """Called for each new node with its ``query.hello`` reply (e.g. to learn its sync state)."""

    def _smashed_shape(self) -> tuple[int, ...] | None:
        """Per-example shape of ``z`` (from one held-out example), for reply validation."""
        if len(self.test) == 0:
            return None
        with torch.no_grad():
            z = self.model.smash(self.test.take(torch.arange(1)).inputs)["z"]
        return tuple(z.shape[1:])

    def _evaluate(self, server_round: int, evaluate_fn) -> dict[str, float]:
        metrics = self.evaluate(server_round)
        if evaluate_fn is not None:
            extra = evaluate_fn(server_round, tensors_to_record(self.model.state_dict()))
            if extra:
                metrics.update(dict(extra))
        return metrics
