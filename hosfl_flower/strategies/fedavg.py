"""The FedAvg baseline: Flower's own ``FedAvg`` on the unsplit model, trained by ``HOSFLClient.fit``.

Nothing of FedAvg is re-implemented here: this class only gives it the same footing as the split
strategies (the same model, data, seed, ``clients-per-round`` and round budget), central evaluation,
byte accounting through a counting grid, the per-round log line and the results files.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from ..accounting import RoundAccount
from ..config import ConfigError, resolve_run_config
from ..data import Examples
from ..evaluation import evaluate_model
from ..models import SplitModel
from ..recording import RunRecorder
from ..records import record_to_tensors, tensors_to_record
from .base import meta_seconds


class AccountingGrid:
    """A ``Grid`` that counts the bytes of every message it sends and receives into ``account``, and
    keeps the ``num-examples`` of each training reply in ``trained``."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.account = RoundAccount()
        self.trained: list[int] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for message in messages:
            self.account.count(message, "down")
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            self.account.count(reply, "up")
            self.account.client_seconds += meta_seconds(reply)
            metrics = None if reply.has_error() else reply.content.metric_records.get("metrics")
            if reply.metadata.message_type.startswith("train") and metrics is not None and "num-examples" in metrics:
                self.trained.append(int(metrics["num-examples"]))
        if messages:
            self.account.round_trips += 1
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class FedAvgBaseline:
    """Flower's ``FedAvg`` with ``clients-per-round`` nodes, ``fedavg.local-steps`` SGD steps at ``fedavg.lr``."""

    name = "fedavg"

    def __init__(self, model: SplitModel, test: Examples, run_config: Mapping[str, Any] | None = None) -> None:
        self.cfg = resolve_run_config(run_config or {})
        self.model = model
        self.test = test
        self.history: list[dict[str, Any]] = []

    def start(self, grid: Grid, num_rounds: int | None = None, timeout: float | None = None) -> Result:
        """Run FedAvg and return its ``Result`` (central evaluation in ``evaluate_metrics_serverapp``)."""
        cfg = self.cfg
        num_rounds = num_rounds or cfg["num-server-rounds"]
        wanted = cfg["min-nodes"] or cfg["clients-per-round"]
        deadline = time.monotonic() + cfg["round-timeout"]
        while len(nodes := list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
            time.sleep(0.2)
        if len(nodes) < cfg["clients-per-round"]:
            raise ConfigError("clients-per-round", cfg["clients-per-round"], f"must be <= the number of nodes ({len(nodes)})")
        random.seed(cfg["seed"])  # FedAvg samples with Python's random module
        strategy = FedAvg(
            fraction_train=min(1.0, cfg["clients-per-round"] / len(nodes)),
            fraction_evaluate=0.0,
            min_train_nodes=cfg["clients-per-round"],
            min_available_nodes=cfg["clients-per-round"],
        )
        counting = AccountingGrid(grid)
        recorder = RunRecorder(self.name, Path(cfg["results-dir"]) if cfg["results-dir"] else None, num_rounds)
        started = [time.perf_counter()]

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            self.model.load_state_dict(record_to_tensors(arrays))
            loss, accuracy = evaluate_model(self.model, self.test, cfg["eval-batch-size"])
            if server_round > 0:
                row = {"round": server_round, **counting.account.as_metrics()}
                steps, batch = cfg["fedavg.local-steps"], cfg["batch-size"]
                row.update({"samples": sum(steps * min(batch, n) for n in counting.trained), "server-steps": 0})
                if server_round % cfg["eval-every"] == 0 or server_round == num_rounds:
                    row.update({"loss": loss, "accuracy": accuracy})
                row["seconds"] = time.perf_counter() - started[0]
                self.history.append(row)
                recorder.record(row)
            counting.account, counting.trained = RoundAccount(), []
            started[0] = time.perf_counter()
            return MetricRecord({"loss": loss, "accuracy": accuracy})

        result = strategy.start(
            grid=counting,
            initial_arrays=tensors_to_record(self.model.state_dict()),
            num_rounds=num_rounds,
            timeout=timeout or cfg["round-timeout"],
            train_config=ConfigRecord({"local-steps": cfg["fedavg.local-steps"], "lr": cfg["fedavg.lr"]}),
            evaluate_fn=evaluate_fn,
        )
        self.model.load_state_dict(record_to_tensors(result.arrays))
        recorder.finish(self.model, cfg, {})
        return result
