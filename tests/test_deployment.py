"""The deployment runtime on loopback: a SuperLink and three SuperNodes over TLS run HO-SFL to the same
result as the in-process reference loop (equal to a simulation with the same seed and partitions), an
insecure deployment completes, and no process is left behind."""

from __future__ import annotations

import importlib.util
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from .conftest import ROOT, assert_equal_to_reference

pytestmark = pytest.mark.slow

NUM_SUPERNODES = 3
RUN_CONFIG = "num-server-rounds=3 eval-every=2 clients-per-round=2 seed=3"  # evaluated after rounds 2 and 3


def _load_runner() -> ModuleType:
    path = ROOT / "examples" / "deployment" / "run.py"
    spec = importlib.util.spec_from_file_location("deployment_runner", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


def _assert_nothing_left(outcome: dict[str, Any]) -> None:
    ports = [outcome["ports"]["superlink"], *outcome["ports"]["supernodes"]]
    assert outcome["leftover_pids"] == []
    assert runner.flower_processes([outcome["work_dir"], *(f"127.0.0.1:{p}" for p in ports)]) == {}


def _rounds(results: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def deployments(tmp_path_factory):
    """Two deployments at the same time (each mostly waits on Flower's polling): HO-SFL over TLS on three
    SuperNodes, and a short insecure one on two. Each entry is the outcome, or the exception it raised."""
    tls_dir, insecure_dir = tmp_path_factory.mktemp("tls-run"), tmp_path_factory.mktemp("plain-run")
    jobs = {
        "tls": dict(
            num_supernodes=NUM_SUPERNODES,
            run_config=f"{RUN_CONFIG} min-nodes={NUM_SUPERNODES} results-dir='{tls_dir / 'results'}'",
            tls=True,
            work_dir=tls_dir / "deployment",
        ),
        "insecure": dict(
            num_supernodes=2,
            run_config="num-server-rounds=1 clients-per-round=2 final-sync=false",
            work_dir=insecure_dir / "deployment",
        ),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(runner.run_deployment, timeout=600, quiet=True, **job) for name, job in jobs.items()}
        done = {}
        for name, future in futures.items():
            try:
                done[name] = future.result()
            except Exception as error:  # noqa: BLE001 - reported by the test that needs this deployment
                done[name] = error
    return done, {"tls": tls_dir, "insecure": insecure_dir}


def _outcome(deployments, name: str) -> dict[str, Any]:
    outcome = deployments[0][name]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def test_tls_deployment_equals_the_reference_loop(deployments):
    """A SuperLink and three SuperNodes over TLS run HO-SFL to the in-process reference loop's result, bit for
    bit (the reference loop equals a simulation with the same seed and partitions: test_simulation.py)."""
    outcome, dep_results = _outcome(deployments, "tls"), deployments[1]["tls"] / "results"
    assert outcome["run"]["status"] == "finished:completed", outcome["run"]
    assert Path(outcome["results_dir"]) == dep_results
    _assert_nothing_left(outcome)

    deployed = _rounds(dep_results)
    assert [r["round"] for r in deployed] == [1, 2, 3]
    assert [r["round"] for r in deployed if "accuracy" in r] == [2, 3]
    assert json.loads((dep_results / "summary.json").read_text())["final"]["final-sync-mismatches"] == 0
    final = torch.load(dep_results / "final-model.pt", weights_only=False)
    assert_equal_to_reference(final, deployed, NUM_SUPERNODES)  # both segments and every round's metrics

    work = Path(outcome["work_dir"])
    config = (work / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in config and "insecure" not in config
    commands = {name: log.read_text().splitlines()[0] for name, log in outcome["logs"].items()}
    assert {"superlink", "supernode-0", "supernode-1", "supernode-2", "flwr-run"} <= commands.keys()
    assert "--ssl-certfile" in commands["superlink"] and "--root-certificates" in commands["supernode-0"]
    assert not any("--insecure" in command for command in commands.values())


def test_insecure_deployment_completes(deployments):
    outcome = _outcome(deployments, "insecure")
    assert outcome["run"]["status"] == "finished:completed", outcome["run"]
    assert _rounds(Path(outcome["results_dir"]))[-1]["round"] == 1
    config = (Path(outcome["work_dir"]) / "flwr-home" / "config.toml").read_text()
    assert "insecure = true" in config and "root-certificates" not in config
    commands = {name: log.read_text().splitlines()[0] for name, log in outcome["logs"].items()}
    assert {"superlink", "supernode-0", "supernode-1", "flwr-run"} <= commands.keys()
    assert all("--insecure" in commands[name] for name in ("superlink", "supernode-0", "supernode-1"))
    _assert_nothing_left(outcome)
