"""``HOSFLStrategy``: one Flower ``Strategy`` that runs any registered protocol.

It does what every protocol shares — discovery, sampling, the accounting link, ``min-replies`` and
rejections, central evaluation, the per-round log line and results files, checkpoints — and leaves
each round's exchanges to the protocol's server part (``hosfl_flower/protocols/<name>/server.py``).

Where it departs from Flower's ``Strategy`` contract, and why: a split round is several dependent
exchanges (HO-SFL: smash, then probe with the ``λ`` of the first), which Flower's one-exchange
``start`` loop (``configure_train`` → ``send_and_receive`` → ``aggregate_train``) cannot express. So
:meth:`start` is replaced; it keeps Flower's signature and returns Flower's ``Result``. The
protocol's server part sends its requests through a :class:`~hosfl_flower.flower.link.GridLink`, so
``configure_train`` / ``aggregate_train`` are not called and return nothing. Evaluation is central
(the server holds both segments), so ``configure_evaluate`` sends nothing; ``evaluate_fn`` is called
after each central evaluation with the whole model's arrays, as Flower's strategies do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..config import resolve_run_config
from ..data import Examples
from ..evaluation import evaluate_model
from ..models import SplitModel
from ..protocols.base import NodeInfo, ProtocolServer, RunSettings, ServerHooks
from ..protocols.messages import ModelSpec
from ..protocols.registry import get_protocol
from ..recording import RunRecorder, numeric
from ..records import record_to_tensors, tensors_to_record
from ..schedule import RoundSchedule
from ..split_server import RaySplitServer, SplitServer, build_split_server, sync_server_segment
from .checkpoints import CheckpointMixin
from .discovery import Federation, NodeDirectory, connected_nodes, wait_for_nodes
from .link import GridLink


class MultiExchangeStrategy(Strategy):
    """Flower's ``Strategy`` for rounds of several dependent exchanges: ``start`` is replaced (see the
    module docstring), so the one-exchange methods below are documented no-ops."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Not used: the protocol's server part sends a round's requests itself (see the module docstring)."""
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Not used (see :meth:`configure_train`)."""
        return None, None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Evaluation is central: no federated evaluation messages."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None


class HOSFLStrategy(CheckpointMixin, ServerHooks, MultiExchangeStrategy):
    """A Flower Message-API ``Strategy`` running the protocol named by ``protocol`` (default: the run
    config's ``strategy``, ``hosfl`` unless set). ``partition_sizes(num_partitions)``, when given, is
    each partition's number of examples as the server computes it: a node claiming another count at
    discovery is refused (without it, the counts the nodes report are used, checked only for range).

    Hooks a subclass may override: :meth:`sample_nodes`, :meth:`aggregation_weights`,
    :meth:`evaluate`, :meth:`build_protocol`.
    """

    def __init__(
        self,
        model: SplitModel,
        test: Examples,
        run_config: Mapping[str, Any] | None = None,
        split_server: SplitServer | RaySplitServer | None = None,
        protocol: str | None = None,
        partition_sizes: Callable[[int], Sequence[int]] | None = None,
    ) -> None:
        self.cfg = resolve_run_config(run_config or {}, {"strategy": protocol} if protocol else {})
        self.spec = get_protocol(self.cfg["strategy"])
        self.name = self.spec.name
        self.model = model
        self.test = test
        self.run = RunSettings.from_config(self.cfg)
        self.settings = self.spec.settings.from_config(self.cfg)
        self.schedule = RoundSchedule(self.cfg["seed"])
        example = test.take(torch.arange(1))
        self.model_spec = ModelSpec.of(model, example.inputs, example.labels)
        self.spec.server.check_setup(model, self.model_spec, self.settings)
        self._split_server = split_server
        self._protocol: ProtocolServer | None = None
        self.federation = Federation(partition_sizes)
        self.nodes: dict[int, NodeInfo] = {}
        self.history: list[dict[str, Any]] = []
        self.evaluations: dict[int, dict[str, Any]] = {}
        self.skipped_in_a_row = 0
        self.results_dir = Path(self.cfg["results-dir"]) if self.cfg["results-dir"] else None
        self.num_rounds = self.run.num_rounds
        self.timeout = float(self.cfg["round-timeout"])
        self.train_config = ConfigRecord()

    # ------------------------------------------------------------------ hooks
    def sample_nodes(self, server_round: int, nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
        """The nodes of ``server_round``: ``clients-per-round`` of them, drawn by partition id with the
        run's seeded schedule (so simulation, deployment and the reference loop agree)."""
        by_partition = {n.partition_id: n for n in nodes}
        picked = self.schedule.sample(list(by_partition), self.run.clients_per_round)
        return [by_partition[p] for p in picked]

    def evaluate(self, server_round: int) -> dict[str, float]:
        """Central evaluation of the current model on the held-out test split."""
        self.sync_server_weights()
        loss, accuracy = evaluate_model(self.model, self.test, self.cfg["eval-batch-size"])
        return {"loss": loss, "accuracy": accuracy}

    def build_protocol(self) -> ProtocolServer:
        """The protocol's server part (called once, when the run starts)."""
        return self.spec.server(self.model, self.model_spec, self.run, self.settings, self.split_server, self.schedule, self)

    def summary(self) -> None:
        """Log the protocol and its settings."""
        keys = ("num-server-rounds", "clients-per-round", "batch-size", "model", "cut-layer", "partitioner", "seed")
        log(INFO, "%s(%s): %s", type(self).__name__, self.name, ", ".join(f"{k}={self.cfg[k]}" for k in keys))

    # ------------------------------------------------------------------ the run
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
                device=self.cfg["split-server.device"],
                precision=self.cfg["split-server.precision"],
                num_gpus=self.cfg["split-server.num-gpus"],
                num_cpus=self.cfg["split-server.num-cpus"],
                ray_address=self.cfg["split-server.ray-address"],
            )
            if isinstance(self._split_server, RaySplitServer) and self.cfg["split-server.ray-address"]:
                import ray

                log(
                    INFO,
                    "[%s] split server: a Ray actor on the cluster at %s (GCS %s, node %s, %s)",
                    self.name,
                    self.cfg["split-server.ray-address"],
                    ray.get_runtime_context().gcs_address,
                    self._split_server.node_id[:12],
                    "connected by the ServerApp" if self._split_server.owns_ray else "Ray already initialised",
                )
        return self._split_server

    @property
    def protocol(self) -> ProtocolServer:
        """The protocol's server part."""
        if self._protocol is None:
            self._protocol = self.build_protocol()
        return self._protocol

    def sync_server_weights(self) -> None:
        """Copy ``θ_s`` from a split server that does not share this process's model (a device, Ray placement)."""
        if self._split_server is not None:
            sync_server_segment(self._split_server, self.model)

    def link(self, grid: Grid, server_round: int) -> GridLink:
        """The link of one round's exchanges."""
        return GridLink(self.name, grid, server_round, self.model_spec, self.timeout, self.train_config)

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
        ``timeout`` default to ``num-server-rounds`` and ``round-timeout``; ``train_config`` keys are
        added to every request's ``config`` record.
        """
        if initial_arrays is not None and len(initial_arrays):
            self.model.load_state_dict(record_to_tensors(initial_arrays))
        self.num_rounds = num_rounds or self.run.num_rounds
        self.timeout = float(timeout or self.cfg["round-timeout"])
        self.train_config = train_config or ConfigRecord()
        self.summary()
        result, recorder = Result(), RunRecorder(self.name, self.results_dir, self.num_rounds)
        first_round = self.start_checkpoints()  # checks checkpoint-dir, resumes; nothing is written before
        recorder.restore(self.history)
        for row in self.history:
            result.train_metrics_clientapp[row["round"]] = MetricRecord(numeric(row))
        self.discover_nodes(grid)
        if first_round == 1:
            self.evaluations[0] = self._evaluate(0, evaluate_fn)
        for server_round in range(first_round, self.num_rounds + 1):
            row = self.run_round(grid, server_round)
            if server_round % self.cfg["eval-every"] == 0 or server_round == self.num_rounds:
                self.evaluations[server_round] = self._evaluate(server_round, evaluate_fn)
                row.update(self.evaluations[server_round])
            result.train_metrics_clientapp[server_round] = MetricRecord(numeric(row))
            self.history.append(row)
            recorder.record(row)
            self.check_progress(row)
            if self.cfg["checkpoint-every"] and server_round % self.cfg["checkpoint-every"] == 0:
                self.save_checkpoint(server_round)
        result.evaluate_metrics_serverapp.update({r: MetricRecord(m) for r, m in sorted(self.evaluations.items())})
        final_link = self.link(grid, 0)
        self.refresh_nodes(grid, final_link, 0)  # a node that restarted in the last round is synchronised too
        final = self.protocol.finish(list(self.nodes.values()), final_link)
        self.sync_server_weights()
        result.arrays = tensors_to_record(self.model.state_dict())
        recorder.finish(self.model, self.cfg, final)
        if isinstance(self._split_server, RaySplitServer):
            self._split_server.close()
        return result

    def run_round(self, grid: Grid, server_round: int) -> dict[str, Any]:
        """One round: sample, let the protocol run its exchanges, and the round's row."""
        started = time.perf_counter()
        link = self.link(grid, server_round)
        self.refresh_nodes(grid, link, server_round)
        nodes = self.sample_nodes(server_round, list(self.nodes.values()))
        metrics = self.protocol.run_round(server_round, nodes, link)
        row: dict[str, Any] = {"round": server_round, **metrics, **link.account.as_metrics()}
        row.update({f"rejected.{reason}": count for reason, count in sorted(link.rejections.items())})
        row["seconds"] = time.perf_counter() - started
        return row

    @property
    def directory(self) -> NodeDirectory:
        """The node list (:attr:`nodes`) and what keeps it in step with the grid."""
        directory = getattr(self, "_directory", None)
        if not isinstance(directory, NodeDirectory) or directory.nodes is not self.nodes:
            directory = self._directory = NodeDirectory(self.nodes, self.name, self.federation)
        return directory

    def discover_nodes(self, grid: Grid) -> None:
        """Wait for enough nodes, then ask every new node who it is (``query.hello``)."""
        wanted = self.cfg["min-nodes"] or self.run.clients_per_round
        connected = wait_for_nodes(grid, wanted, bool(self.cfg["min-nodes"]), self.timeout)
        self.directory.update(self.link(grid, 0), connected, self.protocol.node_discovered)
        if len(self.nodes) < self.run.clients_per_round:
            from ..options import ConfigError

            raise ConfigError(
                "clients-per-round", self.run.clients_per_round, f"must be <= the number of nodes ({len(self.nodes)})"
            )
        log(INFO, "[%s] %d nodes, partitions %s", self.name, len(self.nodes), sorted(n.partition_id for n in self.nodes.values()))

    def refresh_nodes(self, grid: Grid, link: GridLink, server_round: int) -> None:
        """At the start of a round: drop the nodes that left, ask the nodes that joined or reconnected
        (``query.hello`` through the round's ``link``, so its cost and refusals are the round's), and hand
        each added node to the protocol, which catches it up from the round it reports (``server_round``
        0: before the final synchronisation)."""
        when = f"round {server_round}" if server_round else "final sync"
        self.directory.update(link, connected_nodes(grid), self.protocol.node_discovered, when)

    def check_progress(self, row: Mapping[str, Any]) -> None:
        """Stop with an error after ``max-skipped-rounds`` skipped rounds in a row."""
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if row.get("skipped") else 0
        if self.skipped_in_a_row >= self.cfg["max-skipped-rounds"]:
            rejected = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in row.items() if k.startswith("rejected.")) or "none"
            first = row["round"] - self.skipped_in_a_row + 1
            raise RuntimeError(
                f"[{self.name}] no progress: rounds {first}-{row['round']} were all skipped with fewer than "
                f"min-replies={self.run.min_replies} valid replies (rejected in round {row['round']}: {rejected})"
            )

    def _evaluate(self, server_round: int, evaluate_fn) -> dict[str, float]:
        metrics = self.evaluate(server_round)
        if evaluate_fn is not None:
            extra = evaluate_fn(server_round, tensors_to_record(self.model.state_dict()))
            if extra:
                metrics.update(dict(extra))
        return metrics
