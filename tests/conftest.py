"""Shared helpers: running the package's console scripts and ``flwr`` in subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The heaviest modules first (measured, two workers, ``--durations``): ``--dist loadscope`` hands whole
# modules to the two xdist workers in collection order (``--no-loadscope-reorder`` in pyproject.toml), so
# the long ones start early and the many short ones fill in at the end, and both workers finish together.
# Modules of mostly computation (test_learning.py and test_byzantine.py run two processes each, the fuzz test,
# the pretraining) sit between the Flower runs, which wait on Ray and message polling for part of their time,
# so that the other worker's work fills those waits (the suite keeps both cores about 95 % busy).
HEAVIEST_FIRST = (
    "test_strategies.py",
    "test_learning.py",
    "test_reliability.py",
    "test_byzantine.py",
    "test_deployment.py",
    "test_compare.py",
    "test_fuzz_replies.py",
    "test_llm.py",
    "test_reliability_baselines.py",
    "test_pretrain.py",
    "test_flwr_run.py",
    "test_workloads.py",
    "test_memory.py",
    "test_simulation.py",
    "test_protocol_plugin.py",
    "test_devices.py",
    "test_ray_cluster.py",
    "test_estimators.py",
    "test_checkpoint_checks.py",
)


def pytest_collection_modifyitems(config, items):
    """Put the modules of :data:`HEAVIEST_FIRST` first, in that order (a stable sort: the tests of a module,
    and the other modules, keep their order)."""
    rank = {name: index for index, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess running the package's scripts (``hosfl_flower.cli.script_env``)."""
    from hosfl_flower.cli import script_env

    return script_env(**extra)


def run_simulation_cli(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``flower-simulation ARGS`` in a subprocess (each run gets its own Ray)."""
    return subprocess.run(
        [str(BIN / "flower-simulation"), *args],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


ONE_ACTOR = ["--num-cpus-per-client", "2"]
"""``flower-simulation`` arguments for one ClientApp actor on the 2-core CI machine instead of two (every actor
costs about 6 CPU seconds to start). For the runs that test fault handling and kill-and-resume (whose resumed
run starts fresh processes anyway), and the exactness runs of protocols whose nodes keep no state from one
message to the next (FedAvg, the frozen client, test_protocol_plugin.py's toy protocol): not that a node's state
survives moving between processes. The other exactness runs against the reference loop (test_strategies.py,
test_simulation.py, ...) keep the default, two."""


@pytest.fixture
def simulate(tmp_path):
    """Run ``flower-simulation --app APP`` with run-config overrides; return (process, results dir)."""

    def _run(overrides: str, num_supernodes: int = 10, app: str = "hosfl_flower.app", extra_args: Sequence[str] = ()):
        results = tmp_path / "results"
        process = run_simulation_cli(
            [
                "--app",
                app,
                "--num-supernodes",
                str(num_supernodes),
                *extra_args,
                "--run-config",
                f"{overrides} results-dir='{results}'",
            ]
        )
        assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
        return process, results

    return _run


@pytest.fixture
def simulate_file(tmp_path):
    """``flower-simulation --app hosfl_flower.app --run-config FILE --run-config OVERRIDES``."""

    def _run(config_file: str, overrides: str, num_supernodes: int = 10):
        results = tmp_path / "results"
        process = run_simulation_cli(
            [
                "--app",
                "hosfl_flower.app",
                "--num-supernodes",
                str(num_supernodes),
                "--run-config",
                config_file,
                "--run-config",
                f"{overrides} results-dir='{results}'",
            ]
        )
        assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
        return process, results

    return _run


def load_results(results: Path):
    """``(final-model.pt, rounds.jsonl rows, summary.json)`` of a run's results directory."""
    final = torch.load(results / "final-model.pt")
    rows = [json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((results / "summary.json").read_text())
    return final, rows, summary


def assert_equal_to_reference(final, rows, num_partitions, **reference_kwargs):
    """The run's final segments and per-round metrics equal the in-process reference loop's, bit for bit."""
    from hosfl_flower.reference import run_reference

    reference = run_reference(dict(final["config"]), num_partitions, **reference_kwargs)
    for segment in ("client", "server"):
        expected = getattr(reference.model, segment).state_dict()
        assert final[segment].keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(final[segment][name], tensor), f"{segment}.{name} differs from the reference loop"
    by_round = {row["round"]: row for row in reference.history}
    assert [row["round"] for row in rows] == sorted(by_round)
    for row in rows:
        for key in ("train-loss", "accuracy", "loss", "samples", "server-steps", "skipped"):
            assert row.get(key) == by_round[row["round"]].get(key), (row["round"], key)
    return reference
