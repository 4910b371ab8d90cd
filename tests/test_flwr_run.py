"""``flwr run .`` against a private local SuperLink: the run completes, a bad config fails with its message."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import BIN, ROOT, subprocess_env

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


@pytest.fixture
def flwr(tmp_path):
    """Run ``flwr`` with a private FLWR_HOME and ports; stop the SuperLink it starts, by PID."""
    home = tmp_path / "flwr-home"
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


def test_flwr_run_completes_and_a_bad_value_fails_with_its_message(flwr, tmp_path):
    # The `flwr run` layer (FAB build and install, local SuperLink, run config, status and details) does not
    # depend on the strategy: HO-SFL and one baseline (FedAvg, the protocol least like it) run here. Every
    # protocol's own Flower run is in test_strategies.py::test_flower_run_equals_the_reference_loop (through
    # flower-simulation, which loads the same ServerApp and ClientApp, and equal to the reference loop).
    # One ClientApp actor per run (client-resources-num-cpus=2 on the 2-core CI machine; every actor costs about
    # 6 CPU seconds to start): these runs test the `flwr run` layer, not that a node's state moves between processes.
    results = tmp_path / "results"
    hosfl = _submit(
        flwr,
        "--federation-config",
        f"num-supernodes=6 {ONE_ACTOR}",
        "-c",
        f"num-server-rounds=4 eval-every=2 results-dir='{results}'",
    )
    baseline = _submit(
        flwr,
        "--federation-config",
        f"num-supernodes=4 {ONE_ACTOR}",
        "-c",
        f"strategy='fedavg' num-server-rounds=2 eval-every=2 results-dir='{tmp_path / 'fedavg'}'",
    )
    bad = _submit(flwr, "--federation-config", f"num-supernodes=2 {ONE_ACTOR}", "-c", "zo.num-perturbations=-1")

    run = _wait(flwr, hosfl)
    assert run["status"] == "finished:completed", run
    rows = [json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and "accuracy" in rows[1]
    assert json.loads((results / "summary.json").read_text())["final"]["final-sync-nodes"] == 6

    bad = _wait(flwr, bad)
    assert bad["status"] == "finished:failed"
    assert "zo.num-perturbations=-1" in bad["status-details"] and ">= 0" in bad["status-details"]

    run = _wait(flwr, baseline)
    assert run["status"] == "finished:completed", ("fedavg", run)
    summary = json.loads((tmp_path / "fedavg" / "summary.json").read_text())
    assert summary["strategy"] == "fedavg"
