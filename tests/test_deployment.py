"""The deployment runtime on loopback: a SuperLink and three SuperNodes run HO-SFL to the same result
as a simulation with the same seed and partitions, TLS works, and no process is left behind."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .conftest import BIN, ROOT, subprocess_env

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


def _stop_group(process: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue


def test_deployment_matches_simulation(tmp_path):
    sim_results, dep_results = tmp_path / "sim-results", tmp_path / "dep-results"
    sim_log = tmp_path / "simulation.log"
    with open(sim_log, "w") as log:
        simulation = subprocess.Popen(  # runs while the deployment starts up and waits for messages
            [str(BIN / "flower-simulation"), "--app", "hosfl_flower.app", "--num-supernodes", str(NUM_SUPERNODES),
             "--run-config", f"{RUN_CONFIG} results-dir='{sim_results}'"],
            cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        outcome = runner.run_deployment(
            num_supernodes=NUM_SUPERNODES,
            run_config=f"{RUN_CONFIG} min-nodes={NUM_SUPERNODES} results-dir='{dep_results}'",
            work_dir=tmp_path / "deployment",
            timeout=600,
            quiet=True,
        )
        simulation.wait(timeout=600)
    finally:
        if simulation.poll() is None:
            _stop_group(simulation)
    assert outcome["run"]["status"] == "finished:completed", outcome["run"]
    assert Path(outcome["results_dir"]) == dep_results
    _assert_nothing_left(outcome)
    assert simulation.returncode == 0, sim_log.read_text()[-3000:]

    deployed, simulated = _rounds(dep_results), _rounds(sim_results)
    assert [r["round"] for r in deployed] == [1, 2, 3]
    accuracy = lambda rows: [(r["round"], r["accuracy"]) for r in rows if "accuracy" in r]  # noqa: E731
    assert accuracy(deployed) == accuracy(simulated) and [r for r, _ in accuracy(deployed)] == [2, 3]
    assert json.loads((dep_results / "summary.json").read_text())["final"]["final-sync-mismatches"] == 0

    dep_model = torch.load(dep_results / "final-model.pt", weights_only=False)
    sim_model = torch.load(sim_results / "final-model.pt", weights_only=False)
    for part in ("client", "server"):
        assert dep_model[part].keys() == sim_model[part].keys()
        for name, tensor in dep_model[part].items():
            assert torch.equal(tensor, sim_model[part][name]), f"{part}.{name} differs"


def test_tls_deployment_completes(tmp_path):
    outcome = runner.run_deployment(
        num_supernodes=2,
        run_config="num-server-rounds=1 clients-per-round=2 final-sync=false",
        tls=True,
        work_dir=tmp_path / "deployment",
        timeout=600,
        quiet=True,
    )
    assert outcome["run"]["status"] == "finished:completed", outcome["run"]
    assert _rounds(Path(outcome["results_dir"]))[-1]["round"] == 1
    config = (tmp_path / "deployment" / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in config and "insecure" not in config
    commands = {name: log.read_text().splitlines()[0] for name, log in outcome["logs"].items()}
    assert {"superlink", "supernode-0", "supernode-1", "flwr-run"} <= commands.keys()
    assert "--ssl-certfile" in commands["superlink"] and "--root-certificates" in commands["supernode-0"]
    assert not any("--insecure" in command for command in commands.values())
    _assert_nothing_left(outcome)
