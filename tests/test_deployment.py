"""The deployment runtime on loopback, in one run (deployments are the suite's most expensive tests): a
SuperLink and three SuperNodes over TLS with SuperNode authentication run HO-SFL to completion, the split
server a Ray actor on a single-node Ray cluster on 127.0.0.1 that the runner starts for the run, while

- a third SuperNode, started with a key that was never registered, is refused by the SuperLink and its
  partition never appears;
- one registered SuperNode is stopped after round 1 and started again (same key, partition and node
  store): its partition is rediscovered, caught up and takes part in every later round, and the final
  synchronisation finds every node at the server's version;
- the rounds before the restart equal the in-process reference loop's bit for bit (the reference loop
  equals a simulation with the same seed and partitions: test_simulation.py);
- the ServerApp connects to that cluster (its log names the address), the head binds to 127.0.0.1 only;
- no process is left behind, Flower's or Ray's.

The flags and the connection config of the insecure mode (and of this one) are checked without a
deployment in test_deployment_unit.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT
from .test_deployment_unit import _load_runner

pytestmark = pytest.mark.slow

runner = _load_runner()

# Three registered SuperNodes (every message starts a flwr-clientapp process on its SuperNode, about 7 CPU seconds
# each: torch, the data, the model, so each one more costs a process per exchange): one restarted while the other
# two carry round 2, all three in every round after the rejoin.
NUM_SUPERNODES = 3
RESTARTED, AFTER_ROUND = 1, 1  # SuperNode 1 (partition 1) is stopped once round 1 is logged
ROUNDS = 3
# Every round samples every connected node (clients-per-round = the SuperNodes), so the restarted one is in
# each round it is connected for; evaluated every round, so round 1's row carries the model's accuracy.
# The split server reserves one CPU of the Ray head's one (split-server.num-cpus; the runner sets the placement
# and the address).
RUN_CONFIG = (
    f"num-server-rounds={ROUNDS} eval-every=1 clients-per-round={NUM_SUPERNODES} seed=3 round-timeout=120 split-server.num-cpus=1"
)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("deployment")
    return runner.run_deployment(
        num_supernodes=NUM_SUPERNODES,
        run_config=f"{RUN_CONFIG} min-nodes={NUM_SUPERNODES} results-dir='{work / 'results'}'",
        tls=True,
        work_dir=work / "run",
        unregistered_supernodes=1,
        restart_supernode=(RESTARTED, AFTER_ROUND),
        restart_downtime=6.0,  # longer than the ServerApp's 3 s polling: it sees the node gone
        timeout=600,
        quiet=True,
        app_dir=ROOT,
        ray_head=True,
        ray_head_cpus=1,
    )


def _rounds(results: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines()]


def _run_log(outcome: dict[str, Any]) -> str:
    return Path(outcome["logs"][f"run-{outcome['run_id']}"]).read_text()


def test_the_run_completes_over_tls_with_authenticated_supernodes_and_nothing_is_left(deployment):
    assert deployment["run"]["status"] == "finished:completed", deployment["run"]
    assert deployment["node_auth"] and len(deployment["node_ids"]) == NUM_SUPERNODES
    assert deployment["leftover_pids"] == []
    ports = [deployment["ports"]["superlink"], *deployment["ports"]["supernodes"], *deployment["ports"]["unregistered"]]
    assert runner.flower_processes([deployment["work_dir"], *(f"127.0.0.1:{p}" for p in ports)]) == {}

    commands = {name: Path(log).read_text().splitlines()[0] for name, log in deployment["logs"].items()}
    supernodes = [f"supernode-{i}" for i in range(NUM_SUPERNODES)]
    assert {"superlink", *supernodes, f"supernode-{RESTARTED}-restarted", "unregistered-0"} <= set(commands)
    assert "--enable-supernode-auth" in commands["superlink"] and "--ssl-keyfile" in commands["superlink"]
    assert all("--auth-supernode-private-key" in commands[name] for name in supernodes)
    assert not any("--insecure" in command for command in commands.values())
    config = (Path(deployment["work_dir"]) / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in config and "insecure" not in config


def test_a_supernode_with_an_unregistered_key_never_joins(deployment):
    code = deployment["refused"]["unregistered-0"]
    assert code is not None and code != 0, "the SuperNode with an unregistered key was not refused"
    assert "Failed to initialize the connection" in Path(deployment["logs"]["unregistered-0"]).read_text()
    log = _run_log(deployment)
    listed = [json.loads(m) for m in re.findall(r"nodes, partitions (\[[0-9, ]*\])", log)]
    assert listed and all(NUM_SUPERNODES not in partitions for partitions in listed), listed  # its partition: 3
    rows = _rounds(Path(deployment["results_dir"]))
    assert max(row.get("smash-replies", 0) for row in rows) <= NUM_SUPERNODES


def test_a_restarted_supernode_is_rediscovered_and_takes_part_again(deployment):
    restart = deployment["restart"]
    assert restart["phase"] == "done" and restart["exit_code"] == 0, restart
    log = _run_log(deployment)
    joined = [int(r) for r in re.findall(rf"round (\d+): partition {RESTARTED} joined", log)]
    assert joined and joined[0] > AFTER_ROUND, log[-3000:]
    rows = _rounds(Path(deployment["results_dir"]))
    assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
    for row in rows:
        if row["round"] >= joined[0]:  # from its rediscovery on, every node replies in every exchange
            assert row["sampled"] == row["smash-replies"] == row["probe-replies"] == NUM_SUPERNODES, row
            assert "rejected.no-reply" not in row, row
    summary = json.loads((Path(deployment["results_dir"]) / "summary.json").read_text())
    assert summary["final"]["final-sync-nodes"] == NUM_SUPERNODES, summary["final"]
    assert summary["final"]["final-sync-mismatches"] == 0, summary["final"]


def test_the_rounds_before_the_restart_equal_the_reference_loop(deployment):
    import torch

    from hosfl_flower.reference import run_reference

    results = Path(deployment["results_dir"])
    final = torch.load(results / "final-model.pt", weights_only=False)
    reference = {row["round"]: row for row in run_reference(dict(final["config"]), NUM_SUPERNODES).history}
    for row in _rounds(results)[:AFTER_ROUND]:
        for key in ("train-loss", "accuracy", "loss", "samples", "server-steps", "skipped"):
            assert row.get(key) == reference[row["round"]].get(key), (row["round"], key)


def test_the_split_server_ran_as_a_ray_actor_on_the_runners_loopback_cluster_and_no_ray_process_is_left(deployment):
    ray = deployment["ray"]
    address = ray["address"]
    assert address.startswith("127.0.0.1:")
    assert "--node-ip-address=127.0.0.1" in ray["command"] and f"--port={address.split(':')[1]}" in ray["command"]
    assert "--include-dashboard=false" in ray["command"]
    log = _run_log(deployment)
    connected = re.findall(r"split server: a Ray actor on the cluster at (\S+) \(GCS (\S+), node \w+, ([^)]*)\)", log)
    assert connected == [(address, address, "connected by the ServerApp")], log[-3000:]
    config = json.loads((Path(deployment["results_dir"]) / "summary.json").read_text())["config"]
    assert config["split-server.placement"] == "ray" and config["split-server.ray-address"] == address
    assert config["split-server.num-cpus"] == 1.0
    assert "Local node IP: 127.0.0.1" in Path(deployment["logs"]["ray-head"]).read_text()  # loopback only
    assert runner._started(ray["pid"]) is None
    assert runner.ray_processes(ray["temp_dir"], address) == {}  # whenever started: temp dir and port are this run's
