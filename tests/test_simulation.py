"""The Flower layer through real simulation runs: exactness against the reference loop (Ray placement: test_flwr_run.py)."""

import pytest
import torch

from hosfl_flower.accounting import CATEGORIES, CUT_CATEGORIES
from hosfl_flower.reference import run_reference

from .conftest import assert_equal_to_reference, load_results, run_simulation_cli

pytestmark = pytest.mark.slow

ROUNDS = 12
# The run also carries test_estimators.py's central-difference estimator with Rademacher directions (the jvp
# variant rides on test_flwr_run.py's HO-SFL run): 10 nodes, 3 a round, so the nodes that missed rounds catch up by
# replaying those directions. The package-default estimator and directions go through Flower, equal to the
# reference loop, in test_workloads.py (tiny-resnet, under attack), test_llm.py (10 nodes, 3 a round) and
# test_reliability.py (kill and resume, 6 nodes).
VARIANT = {"zo.estimator": "central", "zo.directions": "rademacher"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """12 rounds, evaluated after rounds 6 and 12: enough for the client segment to move and the ledger to grow."""
    results = tmp_path_factory.mktemp("simulation") / "results"
    variant = " ".join(f"{key}='{value}'" for key, value in VARIANT.items())
    process = run_simulation_cli(
        [
            "--app",
            "hosfl_flower.app",
            "--num-supernodes",
            "10",
            "--run-config",
            f"num-server-rounds={ROUNDS} clients-per-round=3 eval-every=6 seed=7 {variant} results-dir='{results}'",
        ]
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    final, rows, summary = load_results(results)
    return process, final, rows, summary


def test_flower_run_is_bit_identical_to_the_reference_loop(run):
    process, final, rows, summary = run
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
    categories = {f"bytes.{c}" for c in CATEGORIES}
    assert rows[0]["bytes.total"] == sum(v for k, v in rows[0].items() if k in categories)
    assert rows[0]["bytes.cut"] == sum(rows[0][f"bytes.{c}"] for c in CUT_CATEGORIES) > 0
    assert rows[0]["bytes.weights"] == rows[0]["bytes.seeds_and_ledger_down"] > 0
    assert rows[0]["bytes.server_averaging"] == 0
    assert rows[0]["bytes.model_down"] == 0 and rows[0]["round-trips"] == 2


def test_flower_run_with_the_central_estimator_and_rademacher_directions_is_bit_identical(run):
    """test_estimators.py's Flower check of an estimator variant (bit-identical: the test above), on this run."""
    _, final, rows, summary = run
    config = dict(final["config"])
    assert {key: config[key] for key in VARIANT} == VARIANT
    reference = run_reference(config, 10)
    assert all(e.directions == "rademacher" for e in reference.ledger) and len(reference.ledger) == ROUNDS
    assert all(r["probe-replies"] == 3 for r in rows) and summary["final"]["final-sync-mismatches"] == 0
    # the variant changed the training: the default estimator and directions end elsewhere
    default = run_reference({**config, "zo.estimator": "forward", "zo.directions": "gaussian"}, 10).model
    assert not torch.equal(default.client.state_dict()["0.0.weight"], final["client"]["0.0.weight"])


# Ray placement of the split server with an AdamW client (equal to the reference loop, every node in sync) runs in
# test_flwr_run.py::test_flower_run_with_an_estimator_variant_is_bit_identical_to_the_reference, which shares that
# run (a `flwr run` submission) with the jvp estimator's check.


# The frozen client (P = 0) through the app directory (``--app .``), moving only the server segment, runs in
# test_strategies.py::test_flower_run_equals_the_reference_loop[frozen-client], which shares that Flower run.
