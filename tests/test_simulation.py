"""The Flower layer through real simulation runs: exactness against the reference loop, Ray placement."""

import pytest
import torch

from hosfl_flower.reference import run_reference

from .conftest import assert_equal_to_reference, load_results

pytestmark = pytest.mark.slow

ROUNDS = 12


def test_flower_run_is_bit_identical_to_the_reference_loop(simulate):
    # 12 rounds, evaluated after rounds 6 and 12: enough for the client segment to move and the ledger to grow
    process, results = simulate(f"num-server-rounds={ROUNDS} clients-per-round=3 eval-every=6 seed=7", num_supernodes=10)
    final, rows, summary = load_results(results)
    assert len(rows) == ROUNDS and all(r["smash-replies"] == 3 and r["probe-replies"] == 3 for r in rows)
    reference = assert_equal_to_reference(final, rows, 10)
    assert len(reference.ledger) == ROUNDS
    # the client segment really moved, so equality is not that of two untouched models
    initial = run_reference({**final["config"], "num-server-rounds": 1, "zo.num-perturbations": 0}, 10).model
    assert not torch.equal(initial.client[0][0].weight, final["client"]["0.0.weight"])
    # every node caught up through the ledger and matches the server's replica
    assert summary["final"] == {"final-sync-nodes": 10, "final-sync-mismatches": 0, "ledger-entries": ROUNDS}
    # one log line per round, with accuracy, loss and bytes
    lines = [line for line in process.stdout.splitlines() + process.stderr.splitlines() if "[hosfl] round" in line]
    assert len(lines) == ROUNDS and "test acc" in lines[5] and "bytes" in lines[5]
    assert rows[0]["bytes.total"] == sum(v for k, v in rows[0].items() if k.startswith("bytes.") and k != "bytes.total")
    assert rows[0]["bytes.model_down"] == 0 and rows[0]["round-trips"] == 2


def test_ray_placement_and_adamw_client_match_the_reference(simulate):
    _, results = simulate(
        "num-server-rounds=6 eval-every=3 split-server.placement='ray' client.optimizer='adamw' client.lr=0.001",
        num_supernodes=5,
    )
    final, rows, summary = load_results(results)
    assert_equal_to_reference(final, rows, 5)
    assert summary["final"]["final-sync-mismatches"] == 0 and summary["final"]["final-sync-nodes"] == 5


def test_frozen_client_moves_only_the_server_via_the_app_directory(simulate):
    _, results = simulate("num-server-rounds=4 zo.num-perturbations=0 eval-every=4", num_supernodes=4, app=".")
    final, rows, summary = load_results(results)
    reference = assert_equal_to_reference(final, rows, 4)
    assert len(reference.ledger) == 0 and all(r["round-trips"] == 1 for r in rows)
    initial = run_reference({**final["config"], "num-server-rounds": 1}, 4).model
    assert all(torch.equal(final["client"][k], v) for k, v in initial.client.state_dict().items())  # never trained
    assert summary["final"]["ledger-entries"] == 0
    assert not torch.equal(initial.server[-1].weight, final["server"][f"{len(initial.server) - 1}.weight"])
