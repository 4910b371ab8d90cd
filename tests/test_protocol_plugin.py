"""A protocol defined outside the package: this file and one ``register_protocol`` call.

The toy protocol trains nothing on the client. Each round the server sends ``train.toy-stats``
(a scale); each node replies with the per-class label counts of its minibatch times the scale; the
server takes one first-order step on its segment with the mean count vector as a bias target (enough
to change ``θ_s`` measurably) and reports the weighted mean. It runs in Flower's simulation engine
(``flower-simulation --app tests.test_protocol_plugin``, which imports this module on the server and
in every Ray actor) and in the reference loop, with the same messages validated and accounted, and
with a user's subclass on each side: a strategy with its own aggregation weights and a client with
its own minibatch rule.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from hosfl_flower import HOSFLClient, HOSFLStrategy
from hosfl_flower import build_apps as package_build_apps
from hosfl_flower.data import Examples
from hosfl_flower.options import Settings, setting
from hosfl_flower.protocols import Payload, ProtocolServer, Reply, ReplyError, ServerHooks, protocols, register_protocol
from hosfl_flower.protocols.messages import compute_seconds, require_record, require_scalars, require_value

NAME = "toy-stats"


@dataclass(frozen=True)
class ToySettings(Settings):
    scale: float = setting("toy.scale", 1.0, "what the nodes multiply their counts by", minimum=0.0, exclusive_minimum=True)


@dataclass
class StatsReply(Reply):
    counts: list[float] = field(default_factory=list)
    num_examples: int = 0

    categories: ClassVar[Mapping[str, str]] = {"stats": "scalars_up", "meta": "other"}
    lie_field: ClassVar[str | None] = "counts"

    def to_record(self) -> RecordDict:
        return RecordDict(
            {"stats": MetricRecord({"counts": self.counts}), "meta": self.meta(**{"num-examples": self.num_examples})}
        )

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> StatsReply:
        stats = require_record(content, "stats", MetricRecord)
        meta = require_record(content, "meta", ConfigRecord)
        counts = require_scalars(stats, "counts", spec.num_classes)
        num_examples = int(require_value(meta, "num-examples", int))
        if abs(sum(counts) - request.scale * num_examples) > 1e-6 * max(num_examples, 1):
            raise ReplyError("wrong-count", "counts do not add up to the batch")
        return cls(counts, num_examples, compute_seconds=compute_seconds(meta))


@dataclass
class StatsRequest(Payload):
    scale: float = 1.0

    message_type: ClassVar[str] = "train.toy_stats"
    reply_type: ClassVar[type[Payload] | None] = StatsReply
    categories: ClassVar[Mapping[str, str]] = {"toy": "seeds_and_ledger_down"}

    def to_record(self) -> RecordDict:
        return RecordDict({"toy": ConfigRecord({"scale": self.scale})})

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> StatsRequest:
        return cls(float(require_value(require_record(content, "toy", ConfigRecord), "scale", float)))


class ToyServer(ProtocolServer[ToySettings]):
    name = NAME

    def run_round(self, server_round, nodes, link) -> dict[str, Any]:
        replies = link.exchange([(node, StatsRequest(self.settings.scale)) for node in nodes])
        metrics: dict[str, Any] = {"samples": sum(r.num_examples for r in replies.values()), "server-steps": 0}
        if not self.enough(replies, "stats", metrics):
            return metrics
        weights = self.weights(server_round, [r.num_examples for r in replies.values()])
        mean = [sum(w * r.counts[c] for w, r in zip(weights, replies.values())) for c in range(self.spec.num_classes)]
        with torch.no_grad():
            bias = self.model.server[-1].bias
            bias.add_(0.01 * (torch.tensor(mean, dtype=bias.dtype) - bias))
        metrics.update({"toy-mean": sum(mean) / len(mean), "server-steps": 1})
        return metrics


def stats(client: HOSFLClient, request: StatsRequest, server_round: int) -> StatsReply:
    batch = client.draw_batch(server_round)
    counts = torch.bincount(batch.labels, minlength=client.model.num_classes).double() * request.scale
    return StatsReply([float(c) for c in counts], len(batch.labels))


if NAME not in protocols():
    register_protocol(NAME, ToyServer, ToySettings, {StatsRequest: stats}, "a toy protocol defined in a test file")


# --------------------------------------------------------------------------- a user's subclasses on each side
class EqualWeightsHooks(ServerHooks):
    """Every reply counts the same, whatever its number of examples."""

    def aggregation_weights(self, server_round, num_examples):
        return [1.0 / len(num_examples)] * len(num_examples)


class EqualWeights(EqualWeightsHooks, HOSFLStrategy):
    """The strategy with the user's aggregation weights."""


class FirstExamples(HOSFLClient):
    """A node's first ``partition + 3`` examples, every round (a user's own minibatch rule)."""

    def draw_batch(self, server_round: int, step: int | None = None) -> Examples:
        return self.train.take(torch.arange(self.settings.partition_id + 3))


def build_apps(overrides=None):
    """What ``flower-simulation --app tests.test_protocol_plugin`` runs: the user's classes on both sides."""
    return package_build_apps(overrides, strategy_class=EqualWeights, client_class=FirstExamples)


# One Flower run that both tests read: 4 nodes, every one sampled each round, partition 0 lying (NaN counts), so
# each round has 3 valid replies, from partitions 1-3 (FirstExamples: 4, 5 and 6 examples). One ClientApp actor:
# the toy protocol keeps no node state, so there is no state to carry between processes.
SIMULATED = (
    "strategy='toy-stats' toy.scale=2.0 num-server-rounds=3 clients-per-round=4 min-replies=3 eval-every=3 "
    "final-sync=false faults.nan-partition=0"
)


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory):
    """``flower-simulation --app tests.test_protocol_plugin`` (this module on the server and in the Ray actor):
    the run's (final model, rows, summary)."""
    from .conftest import BIN, ONE_ACTOR, ROOT, load_results, subprocess_env

    results = tmp_path_factory.mktemp("plugin") / "results"
    process = subprocess.run(
        [
            str(BIN / "flower-simulation"),
            "--app",
            "tests.test_protocol_plugin",
            "--num-supernodes",
            "4",
            *ONE_ACTOR,
            "--run-config",
            f"{SIMULATED} results-dir='{results}'",
        ],
        cwd=ROOT,
        env=subprocess_env(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return load_results(results)


@pytest.mark.slow
def test_a_protocol_from_a_test_file_runs_in_flower_and_in_the_reference_loop(plugin_run):
    from hosfl_flower.reference import run_reference

    from .conftest import assert_equal_to_reference

    final, rows, summary = plugin_run
    assert summary["strategy"] == NAME and len(rows) == 3
    assert all(row["bytes.scalars_up"] > 0 and row["bytes.seeds_and_ledger_down"] > 0 for row in rows)  # accounted as declared
    assert all(row["samples"] == 4 + 5 + 6 for row in rows)  # FirstExamples ran on the nodes (partition + 3 examples each)
    reference = assert_equal_to_reference(final, rows, 4, hooks=EqualWeightsHooks(), client_class=FirstExamples)
    assert [r["toy-mean"] for r in rows] == [r["toy-mean"] for r in reference.history]
    # the user's aggregation weights took effect: the default weights (by examples) end elsewhere
    default = run_reference(dict(final["config"]), 4, client_class=FirstExamples)
    assert [r["toy-mean"] for r in default.history] != [r["toy-mean"] for r in rows]
    assert not torch.equal(default.model.server[-1].bias, final["server"][f"{len(default.model.server) - 1}.bias"])


@pytest.mark.slow
def test_its_replies_are_validated_and_a_lying_node_is_rejected(plugin_run):
    _, rows, _ = plugin_run
    assert all(row["rejected.non-finite"] == 1 and not row.get("skipped") for row in rows)
