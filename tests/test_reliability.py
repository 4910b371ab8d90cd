"""Reliability through real simulation runs: injected faults, skipped rounds, kill-and-resume, refused checkpoints."""

import json
import math
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from hosfl_flower.app import build_strategy
from hosfl_flower.checkpoint import CheckpointError, checkpoint_path, read_checkpoint, save_checkpoint

from .conftest import BIN, ONE_ACTOR, ROOT, assert_equal_to_reference, load_results, run_simulation_cli, subprocess_env


def _all_finite(final):
    return all(bool(torch.isfinite(t).all()) for segment in ("client", "server") for t in final[segment].values())


@pytest.mark.slow
def test_faulty_nodes_are_dropped_counted_and_never_corrupt_the_model(simulate):
    """30 % of train replies fail (before or after the node's work), partition 1 sends NaN scalars,
    partition 2 one scalar too few; a round with fewer than 2 valid replies in either exchange is skipped."""
    _, results = simulate(
        "num-server-rounds=30 eval-every=1 clients-per-round=5 min-replies=2 max-skipped-rounds=30 "
        "faults.failure-rate=0.3 faults.nan-partition=1 faults.wrong-count-partition=2",
        num_supernodes=10,
        extra_args=ONE_ACTOR,
    )
    final, rows, summary = load_results(results)
    assert len(rows) == 30 and _all_finite(final)
    assert all(math.isfinite(row["loss"]) and math.isfinite(row.get("train-loss", 0.0)) for row in rows)
    rejected = {
        reason: sum(row.get(f"rejected.{reason}", 0) for row in rows) for reason in ("error", "non-finite", "wrong-count")
    }
    assert rejected["non-finite"] > 0 and rejected["wrong-count"] > 0
    sent = sum(row["sampled"] + row.get("smash-replies", 0) for row in rows)  # train.smash + train.probe messages
    assert 0.15 * sent < rejected["error"] < 0.45 * sent
    skipped = [row for row in rows if row.get("skipped")]
    assert 0 < len(skipped) < 30
    # a skipped round leaves both segments as they were: its evaluation equals the previous round's
    by_round = {row["round"]: row for row in rows}
    for row in skipped:
        if row["round"] > 1:
            assert (row["loss"], row["accuracy"]) == (by_round[row["round"] - 1]["loss"], by_round[row["round"] - 1]["accuracy"])
    # kept rounds aggregate over the surviving replies only and still learn
    assert all(row["probe-replies"] >= 2 for row in rows if not row.get("skipped"))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05 and rows[-1]["accuracy"] > 0.25
    # one ledger entry per kept round; every node, including those that missed rounds or lied, ends bit-identical
    assert summary["final"] == {"final-sync-nodes": 10, "final-sync-mismatches": 0, "ledger-entries": 30 - len(skipped)}


@pytest.mark.slow
def test_a_run_that_cannot_make_progress_stops_with_a_clear_error(tmp_path):
    process = run_simulation_cli(
        [
            "--app",
            "hosfl_flower.app",
            "--num-supernodes",
            "4",
            *ONE_ACTOR,
            "--run-config",
            f"num-server-rounds=20 max-skipped-rounds=2 faults.failure-rate=1.0 results-dir='{tmp_path}'",
        ],
        timeout=300,
    )
    assert process.returncode != 0
    assert (
        "no progress: rounds 1-2 were all skipped with fewer than min-replies=1 valid replies" in process.stderr + process.stdout
    )
    rows = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [row["skipped"] for row in rows] == [1, 1]


RESUME_ROUNDS = 12  # checkpoints after rounds 4, 8 and 12: killed after the first, resumed for the other two
RESUME_CONFIG = (
    f"num-server-rounds={RESUME_ROUNDS} eval-every=2 checkpoint-every=4 client.optimizer='adamw' client.lr=0.001 seed=3"
)


def _kill_after_first_checkpoint(checkpoints, results):
    """Start the run in its own process group, kill it (SIGKILL, with every descendant) once a checkpoint exists."""
    process = subprocess.Popen(
        [
            str(BIN / "flower-simulation"),
            "--app",
            "hosfl_flower.app",
            "--num-supernodes",
            "6",
            *ONE_ACTOR,
            "--run-config",
            f"{RESUME_CONFIG} checkpoint-dir='{checkpoints}' results-dir='{results}'",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    try:
        while not checkpoint_path(checkpoints).exists():
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
    finally:
        family = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
        os.killpg(process.pid, signal.SIGKILL)
        for child in family:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        process.wait(timeout=60)
        psutil.wait_procs(family, timeout=30)
    return int(read_checkpoint(checkpoints)["round"])


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A run (AdamW client, so optimizer state matters; a checkpoint every 4 rounds) killed with SIGKILL once its
    first checkpoint exists, then resumed from it to the end: (round killed at, resumed process, its directory)."""
    directory = tmp_path_factory.mktemp("resumed")
    checkpoints, results = directory / "checkpoints", directory / "results"
    killed_at = _kill_after_first_checkpoint(checkpoints, results)
    process = run_simulation_cli(
        [
            "--app",
            "hosfl_flower.app",
            "--num-supernodes",
            "6",
            *ONE_ACTOR,
            "--run-config",
            f"{RESUME_CONFIG} resume=true checkpoint-dir='{checkpoints}' results-dir='{results}'",
        ]
    )
    return killed_at, process, directory


@pytest.mark.slow
def test_killed_run_resumes_bit_identical_to_the_uninterrupted_run(resumed_run):
    killed_at, process, directory = resumed_run
    assert 4 <= killed_at < RESUME_ROUNDS
    assert process.returncode == 0, process.stderr[-3000:]
    assert f"resumed from the checkpoint of round {killed_at}" in process.stdout + process.stderr
    final, rows, summary = load_results(directory / "results")
    # The uninterrupted run is the in-process reference loop, which an uninterrupted Flower run equals bit for bit
    # (test_simulation.py; with an AdamW client: test_flwr_run.py's HO-SFL run). Both
    # segments and every round's train-loss, loss, accuracy, samples, server steps and skips are compared.
    reference = assert_equal_to_reference(final, rows, 6)
    assert [r["round"] for r in rows] == list(range(1, RESUME_ROUNDS + 1))
    for row, want in zip(rows, reference.history):
        for key in ("smash-replies", "probe-replies"):
            assert row.get(key) == want.get(key), (row["round"], key)
    assert len(reference.ledger) == RESUME_ROUNDS
    assert summary["final"] == {"final-sync-nodes": 6, "final-sync-mismatches": 0, "ledger-entries": RESUME_ROUNDS}


@pytest.fixture
def saved_run(resumed_run):
    """The last checkpoint (round 12) of the resumed run, a complete run, and a config that may resume it."""
    return resumed_run[2] / "checkpoints", {
        "num-server-rounds": 30,
        "eval-every": 2,
        "client.optimizer": "adamw",
        "client.lr": 0.001,
        "seed": 3,
        "resume": True,
    }


def _strategy(config, checkpoints):
    return build_strategy({**config, "checkpoint-dir": str(checkpoints), "results-dir": ""})


def _refused_and_unchanged(strategy, match):
    """``resume()`` raises ``CheckpointError`` matching ``match`` and leaves the strategy as it was."""
    before = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        strategy.resume()
    assert all(torch.equal(v, before[k]) for k, v in strategy.model.state_dict().items())
    assert len(strategy.protocol.ledger) == 0 and strategy.history == []


@pytest.mark.slow
def test_a_good_checkpoint_loads_whole(saved_run):
    checkpoints, config = saved_run
    strategy = _strategy(config, checkpoints)
    assert strategy.resume() == RESUME_ROUNDS
    history = [row["round"] for row in strategy.history]
    assert strategy.protocol.ledger.last_round == RESUME_ROUNDS and history == list(range(1, RESUME_ROUNDS + 1))
    assert strategy.protocol.sync.optimizer.state_tensors()["step"].item() == RESUME_ROUNDS
    assert set(strategy.evaluations) == {0, *range(2, RESUME_ROUNDS + 1, 2)}


@pytest.mark.parametrize("keep", [0.5, 0.99])
@pytest.mark.slow
def test_a_truncated_checkpoint_is_refused(saved_run, tmp_path, keep):
    checkpoints, config = saved_run
    data = checkpoint_path(checkpoints).read_bytes()
    checkpoint_path(tmp_path).write_bytes(data[: int(len(data) * keep)])
    _refused_and_unchanged(_strategy(config, tmp_path), "truncated")


@pytest.mark.slow
def test_a_flipped_byte_is_refused(saved_run, tmp_path):
    checkpoints, config = saved_run
    data = bytearray(checkpoint_path(checkpoints).read_bytes())
    data[-100] ^= 0xFF
    checkpoint_path(tmp_path).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        _strategy(config, tmp_path).resume()


@pytest.mark.parametrize("key,value", [("seed", 1), ("cut-layer", 2), ("zo.num-perturbations", 4)])
@pytest.mark.slow
def test_a_checkpoint_of_another_run_is_refused_naming_the_key(saved_run, key, value):
    checkpoints, config = saved_run
    _refused_and_unchanged(_strategy({**config, key: value}, checkpoints), f"different run: {key}=")


@pytest.mark.slow
def test_a_state_that_does_not_fit_is_refused_before_anything_loads(saved_run, tmp_path):
    checkpoints, config = saved_run
    content = read_checkpoint(checkpoints)
    state = content["state"]
    name = next(iter(state["server"]["weights"]))
    state["server"]["weights"][name] = torch.zeros(7)
    save_checkpoint(tmp_path, content["round"], content["config"], state)
    _refused_and_unchanged(_strategy(config, tmp_path), f"server segment.{name}")


@pytest.mark.slow
def test_a_bad_schedule_is_refused_before_anything_loads(saved_run, tmp_path):
    checkpoints, config = saved_run
    content = read_checkpoint(checkpoints)
    content["state"]["schedule"] = {"bit_generator": "no-such-generator"}
    save_checkpoint(tmp_path, content["round"], content["config"], content["state"])
    _refused_and_unchanged(_strategy(config, tmp_path), "schedule is of generator 'no-such-generator'")


def test_a_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        _strategy({"resume": True}, tmp_path / "nowhere").resume()
