"""Every protocol through Flower's simulation engine equals the reference loop bit for bit; every
protocol learns the digits (in the reference loop, which the first tests tie to Flower); SplitFed V1
and V2 agree with one client; HERON-SFL's server sees a smashed batch every k local steps."""

import math

import pytest
import torch

from hosfl_flower.config import DEFAULTS, resolve_run_config
from hosfl_flower.reference import run_reference
from hosfl_flower.task import server_model_and_test

from .conftest import ONE_ACTOR, assert_equal_to_reference, load_results

# Short Flower runs, one per protocol (HO-SFL's own, longer ones are in test_simulation.py), with
# settings that exercise what is particular to each: SplitFed's local steps, V1's Ray copies,
# HERON-SFL's uploads under label skew, ZO-SFL's and the frozen client's ledger.
# ZO-SFL, SplitFed V2 and HERON-SFL run with one byzantine node of the 3 sampled every round
# (HO-SFL's is test_workloads.py's tiny-resnet run): in-bound huge values on odd rounds, which the reply bound
# rejects, a plausible flip on even rounds, which a robust rule combines; Flower equals the reference loop.
BYZANTINE = "faults.byzantine-partition=2 faults.byzantine-mode='mixed'"
EXACT = [
    ("frozen-client", "", 4),
    ("zo-sfl", f"zo.num-perturbations=3 aggregation.rule='median' {BYZANTINE}", 3),
    ("splitfed-v2", f"splitfed.local-steps=2 aggregation.rule='median' {BYZANTINE}", 3),
    # two nodes a round: two server copies, each its own Ray actor (a process), stepped in parallel and averaged
    ("splitfed-v1", "splitfed.local-steps=2 split-server.placement='ray' clients-per-round=2", 4),
    (
        "heron-sfl",
        f"heron.local-steps=6 heron.upload-every=2 partitioner='dirichlet' aggregation.rule='clipped-mean' {BYZANTINE}",
        3,
    ),
    ("fedavg", "fedavg.local-steps=2", 4),
    ("cse-fsl", f"cse-fsl.local-steps=4 cse-fsl.upload-every=2 aggregation.rule='clipped-mean' {BYZANTINE}", 3),
    ("fsl-sage", "fsl-sage.local-steps=2 fsl-sage.upload-every=1 fsl-sage.align-every=2 fsl-sage.align-epochs=2", 3),
    # the replicas are Ray actors; the byzantine node's z± and batches are bounded and combined by the median
    ("mu-splitfed", f"mu-splitfed.local-steps=2 split-server.placement='ray' aggregation.rule='median' {BYZANTINE}", 3),
]
# One ClientApp actor (``ONE_ACTOR``) where no node state outlives a message, so none can be lost between processes:
# FedAvg's nodes get the whole model in every request, and so do the auxiliary-network family's (HERON-SFL,
# CSE-FSL, FSL-SAGE: θ_c and the head, one exchange a round); the frozen client's θ_c never changes (no ledger
# entries). The others keep two actors, so a node's messages (and the steps of one round) land in different processes.
STATELESS_NODES = {"fedavg", "frozen-client", "heron-sfl", "cse-fsl", "fsl-sage"}


@pytest.mark.parametrize("strategy,extra,nodes", EXACT, ids=[s for s, *_ in EXACT])
@pytest.mark.slow
def test_flower_run_equals_the_reference_loop(simulate, strategy, extra, nodes):
    # The frozen client (HO-SFL with P = 0) runs from the app directory (``--app .``: the components named in
    # pyproject.toml), which test_simulation.py checked with ``zo.num-perturbations=0`` in a run of its own.
    app = "." if strategy == "frozen-client" else "hosfl_flower.app"
    overrides = f"strategy='{strategy}' num-server-rounds=3 eval-every=3 seed=5 {extra}"
    _, results = simulate(overrides, num_supernodes=nodes, app=app, extra_args=ONE_ACTOR if strategy in STATELESS_NODES else ())
    final, rows, summary = load_results(results)
    assert summary["strategy"] == strategy and len(rows) == 3
    assert all(row["bytes.total"] > 0 and not row.get("skipped") for row in rows)
    reference = assert_equal_to_reference(final, rows, nodes)
    initial, _ = server_model_and_test(resolve_run_config(final["config"]))
    assert not torch.equal(initial.server[-1].weight, reference.model.server[-1].weight)  # the run trained
    if "byzantine" in extra:
        bounded = {row["round"] for row in rows if row.get("rejected.out-of-bound")}
        assert {1, 3} <= bounded, rows  # every huge reply is rejected; a flipped one may be too
        assert all(bool(torch.isfinite(t).all()) for segment in ("client", "server") for t in final[segment].values())
    if strategy == "heron-sfl":
        assert all(row["server-batches"] == 3 * row["replies"] and row["replies"] >= 2 for row in rows)
        assert all(row["bytes.activations_up"] > 0 and row["bytes.model_up"] > 0 for row in rows)
    if strategy in ("cse-fsl", "fsl-sage"):  # one exchange a round, no gradient down
        assert all(row["round-trips"] == 1 and row["bytes.activation_grads_down"] == 0 for row in rows)
        assert all(row["bytes.cut"] == row["bytes.activations_up"] + row["bytes.labels_up"] > 0 for row in rows)
    if strategy == "fsl-sage":  # aligned in rounds 1 and 3 (l = 2)
        assert [round_ for round_, row in enumerate(rows, 1) if "align-loss" in row] == [1, 3]
    if strategy == "mu-splitfed":  # 2 steps of (smash, scalar); the replicas' averaging counted apart
        assert all(row["round-trips"] == 4 and row["bytes.scalars_down"] > 0 for row in rows)
        assert all(0 < row["bytes.server_averaging"] and row["server-steps"] >= 2 * 2 * row["finished"] for row in rows)
    if strategy == "frozen-client":
        assert all(torch.equal(final["client"][k], v) for k, v in initial.client.state_dict().items())  # never trained
        assert len(reference.ledger) == 0 and all(row["round-trips"] == 1 for row in rows)  # no probe exchange
        assert summary["final"]["ledger-entries"] == 0


# (strategy, extra run config, rounds, bar): bars sit below the accuracies measured with these settings
# (seed 0, 10 nodes, 3 per round, batch 32, IID, the CNN cut after block 2, P = 5, server AdamW 3e-3 —
# pinned in SETTINGS; the 5-seed comparison at the package defaults is in docs/tuning.md; chance is 0.10).
# HO-SFL's own bars are in test_learning.py.
SETTINGS = {"cut-layer": 2, "zo.num-perturbations": 5, "server.lr": 0.003}
LEARNING = [
    ("splitfed-v2", {}, 25, 0.65),
    ("splitfed-v1", {}, 50, 0.70),
    ("fedavg", {}, 50, 0.85),
    ("heron-sfl", {"heron.lr": 0.01}, 25, 0.70),
    # seeds 0-4 at these settings, 25 rounds: CSE-FSL 0.917-0.956, FSL-SAGE 0.850-0.903 (package lr 0.3)
    ("cse-fsl", {}, 25, 0.80),
    ("fsl-sage", {}, 25, 0.75),
]


@pytest.mark.parametrize("strategy,extra,rounds,bar", LEARNING, ids=[s for s, *_ in LEARNING])
def test_strategy_learns_digits(strategy, extra, rounds, bar):
    config = {**SETTINGS, **extra, "strategy": strategy, "num-server-rounds": rounds, "eval-every": rounds // 2}
    history = run_reference(config, 10).history
    evaluated = [row for row in history if "accuracy" in row]
    assert evaluated[-1]["accuracy"] >= bar, [row["accuracy"] for row in evaluated]
    assert evaluated[-1]["loss"] < math.log(10) - 0.05, [row["loss"] for row in evaluated]  # below a uniform guess


def test_frozen_client_stays_below_hosfl():
    config = {"num-server-rounds": 30, "eval-every": 10}
    frozen = run_reference({**config, "strategy": "frozen-client"}, 4)
    hosfl = run_reference({**config, "zo.num-perturbations": DEFAULTS["zo.num-perturbations"]}, 4)
    initial = run_reference({**config, "strategy": "frozen-client", "num-server-rounds": 1}, 4)
    assert torch.equal(initial.model.client[0][0].weight, frozen.model.client[0][0].weight)
    assert len(frozen.ledger) == 0 and len(hosfl.ledger) == 30
    assert hosfl.history[-1]["accuracy"] >= frozen.history[-1]["accuracy"]


def test_splitfed_v1_equals_v2_with_one_client():
    config = {"num-server-rounds": 3, "clients-per-round": 1, "splitfed.local-steps": 2, "eval-every": 3}
    v1 = run_reference({**config, "strategy": "splitfed-v1"}, 2).model.state_dict()
    v2 = run_reference({**config, "strategy": "splitfed-v2"}, 2).model.state_dict()
    assert v1.keys() == v2.keys() and all(torch.equal(v1[k], v2[k]) for k in v1)


# Zeroth-order on both segments learns a CNN from scratch only slowly (the HO-SFL paper's pure
# zeroth-order baselines fail too): at SETTINGS and the package rates the test loss falls, the accuracy
# stays near chance. Measured over seeds, from the first evaluated round to round 150:
# - zo-sfl (rounds 50 → 150, seeds 0-7): the loss fell by 0.006-0.047 on every seed; accuracy 0.08-0.28.
#   past round 200 the rate 0.05 diverges at these settings on 6 of those 8 seeds (docs/tuning.md, section 7);
# - mu-splitfed (rounds 30 → 150, seeds 0-4): fell by 0.003-0.013; accuracy 0.06-0.16.
ZEROTH_ORDER = [("zo-sfl", 50, 0.002), ("mu-splitfed", 30, 0.001)]


@pytest.mark.parametrize("strategy,eval_every,fall", ZEROTH_ORDER, ids=[s for s, *_ in ZEROTH_ORDER])
def test_zeroth_order_on_both_segments_lowers_the_digits_loss(strategy, eval_every, fall):
    config = {**SETTINGS, "strategy": strategy, "num-server-rounds": 150, "eval-every": eval_every}
    evaluated = [row for row in run_reference(config, 10).history if "loss" in row]
    assert evaluated[-1]["loss"] < evaluated[0]["loss"] - fall, [row["loss"] for row in evaluated]
    assert all(math.isfinite(row["loss"]) for row in evaluated)
