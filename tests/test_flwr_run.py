"""``flwr run .`` against a private local SuperLink: the run completes, a bad config fails with its message; the
HO-SFL run (the jvp estimator, the split server in its own Ray actor, an AdamW client) equals the reference loop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from .conftest import BIN, ROOT, assert_equal_to_reference, load_results, subprocess_env

pytestmark = pytest.mark.slow

ONE_ACTOR = "client-resources-num-cpus=2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_matching(*needles: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(needle in cmdline for needle in needles):
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def flwr(tmp_path_factory):
    """Run ``flwr`` with a private FLWR_HOME and ports; stop the SuperLink it starts, by PID."""
    home = tmp_path_factory.mktemp("flwr") / "flwr-home"
    env = subprocess_env(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
    )

    def _flwr(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    yield _flwr
    for pid in _pids_matching("flower-superlink", str(home)):
        children = _pids_matching("flower-superexec", f"--parent-pid {pid}")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in [pid, *children]):
            time.sleep(0.2)
        for leftover in [p for p in [pid, *children] if Path(f"/proc/{p}/cmdline").exists()]:
            os.kill(leftover, signal.SIGKILL)
    assert not _pids_matching("flower-superlink", str(home))


def _submit(flwr, *args: str) -> str:
    submitted = flwr("run", ".", "--format", "json", *args)
    payload = json.loads(submitted.stdout[submitted.stdout.index("{") :])
    assert payload.get("success"), submitted.stdout + submitted.stderr
    return payload["run-id"]


def _wait(flwr, run_id: str, limit: float = 400) -> dict:
    """The run's ``flwr ls`` record once it is ``finished:*``. ``flwr log --stream`` first: it returns when the
    run ends and waits without work, where every ``flwr ls`` is a process start (about a CPU second)."""
    deadline = time.monotonic() + limit
    try:
        flwr("log", run_id, "--stream", timeout=limit)
    except subprocess.TimeoutExpired:
        pass
    while time.monotonic() < deadline:
        listed = flwr("ls", "--run-id", run_id, "--format", "json")
        runs = json.loads(listed.stdout[listed.stdout.index("{") :]).get("runs", [])
        if runs and runs[0]["status"].startswith("finished:"):
            return runs[0]
        time.sleep(2)
    raise AssertionError(f"run {run_id} did not finish in {limit}s")


# The HO-SFL submission is also test_estimators.py's Flower run of the jvp estimator: with the split server in its
# own Ray actor (``split-server.placement='ray'``) and an AdamW client (its moments are node state), 10 nodes, 3 a
# round, and the default two ClientApp actors, so nodes catch up and move between processes (as in
# test_simulation.py, whose run carries the central-difference variant).
VARIANT = "zo.estimator='jvp' split-server.placement='ray' client.optimizer='adamw' client.lr=0.001"
HOSFL = f"num-server-rounds=6 clients-per-round=3 eval-every=3 seed=3 {VARIANT}"


@pytest.fixture(scope="module")
def submitted(flwr, tmp_path_factory):
    """Three runs on the local SuperLink, one after the other: {name: (its ``flwr ls`` record, its results dir)}.

    One at a time, so that no two Ray clusters compete for the 2 cores. The FedAvg and the failing runs have one
    ClientApp actor each (client-resources-num-cpus=2 on the 2-core CI machine; every actor costs about 6 CPU
    seconds to start): they test the `flwr run` layer, not that a node's state moves between processes.
    """
    work = tmp_path_factory.mktemp("flwr-runs")
    submissions = {
        "hosfl": ("--federation-config", "num-supernodes=10", "-c", f"{HOSFL} results-dir='{work / 'hosfl'}'"),
        "fedavg": (
            "--federation-config",
            f"num-supernodes=4 {ONE_ACTOR}",
            "-c",
            f"strategy='fedavg' num-server-rounds=2 eval-every=2 results-dir='{work / 'fedavg'}'",
        ),
        "bad": ("--federation-config", f"num-supernodes=2 {ONE_ACTOR}", "-c", "zo.num-perturbations=-1"),
    }
    return {name: (_wait(flwr, _submit(flwr, *args)), work / name) for name, args in submissions.items()}


def test_flwr_run_completes_and_a_bad_value_fails_with_its_message(submitted):
    # The `flwr run` layer (FAB build and install, local SuperLink, run config, status and details) does not
    # depend on the strategy: HO-SFL and one baseline (FedAvg, the protocol least like it) run here. Every
    # protocol's own Flower run is in test_strategies.py::test_flower_run_equals_the_reference_loop (through
    # flower-simulation, which loads the same ServerApp and ClientApp, and equal to the reference loop).
    run, results = submitted["hosfl"]
    assert run["status"] == "finished:completed", run
    rows = [json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6] and "accuracy" in rows[2]
    assert json.loads((results / "summary.json").read_text())["final"]["final-sync-nodes"] == 10

    bad, _ = submitted["bad"]
    assert bad["status"] == "finished:failed"
    assert "zo.num-perturbations=-1" in bad["status-details"] and ">= 0" in bad["status-details"]

    run, results = submitted["fedavg"]
    assert run["status"] == "finished:completed", ("fedavg", run)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["strategy"] == "fedavg"


def test_flower_run_with_an_estimator_variant_is_bit_identical_to_the_reference(submitted):
    """test_estimators.py's Flower check of the jvp variant (formerly test_simulation.py's Ray-placement check too)."""
    from hosfl_flower.reference import run_reference

    run, results = submitted["hosfl"]
    assert run["status"] == "finished:completed", run
    final, rows, summary = load_results(results)
    assert len(rows) == 6 and all(r["probe-replies"] == 3 for r in rows)
    reference = assert_equal_to_reference(final, rows, 10)
    config = dict(final["config"])
    assert (config["zo.estimator"], config["split-server.placement"], config["client.optimizer"]) == ("jvp", "ray", "adamw")
    assert all(e.directions == config["zo.directions"] for e in reference.ledger) and len(reference.ledger) == 6
    assert summary["final"] == {"final-sync-nodes": 10, "final-sync-mismatches": 0, "ledger-entries": 6}
    # the variant changed the training: the default estimator and directions end elsewhere
    default = run_reference({**config, "zo.estimator": "forward", "zo.directions": "gaussian"}, 10).model
    assert not torch.equal(default.client.state_dict()["0.0.weight"], final["client"]["0.0.weight"])
