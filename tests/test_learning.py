"""HO-SFL with the default settings learns the digits on every seed, stays stable, and beats the
frozen-client ablation, IID and under Dirichlet skew (in-process reference loop; test_simulation.py
shows the Flower run is bit-identical to it). Bars come from the sweep in docs/tuning.md."""

from concurrent.futures import ProcessPoolExecutor

import pytest

from hosfl_flower.reference import run_reference

SEEDS = (0, 1, 2, 3, 4)
ROUNDS = 100
EVAL_EVERY = 5
STABLE_FROM = 30
# Measured over seeds 0-19 (IID, 100 rounds): final accuracy 0.907 ± 0.033 (worst 0.789), frozen client 0.771 ±
# 0.102; the largest drop between consecutive evaluations after round 30 is 0.038 on average per seed, 0.106 at worst
# (seed 11; 0.072 for seed 0, the worst of the seeds tested). A drop is one evaluation on 360 held-out digits.
MAX_DROP = 0.15
# The margin over the frozen client is 0.137 ± 0.084 over seeds 0-19, its smallest +0.07 on the seeds tested
# (seed 7 ties the frozen client at 0.861: HO-SFL is better on average, not on every seed whatever the seed).
IID_MARGIN = 0.02
DIRICHLET_BAR = 0.60  # measured: worst seed 0.744 at 100 rounds (α = 0.3; chance 0.10, frozen client 0.37 ± 0.20)


def _accuracies(overrides: dict) -> list[tuple[int, float]]:
    config = {"num-server-rounds": ROUNDS, "eval-every": EVAL_EVERY, **overrides}
    return [(row["round"], row["accuracy"]) for row in run_reference(config, 10).history if "accuracy" in row]


def _curves(**overrides) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """HO-SFL (defaults) and the frozen client (P = 0) on every seed, two processes at a time."""
    jobs = {
        (arm, seed): {**overrides, "seed": seed, **({"zo.num-perturbations": 0} if arm == "frozen" else {})}
        for arm in ("hosfl", "frozen")
        for seed in SEEDS
    }
    with ProcessPoolExecutor(2) as pool:
        futures = {key: pool.submit(_accuracies, config) for key, config in jobs.items()}
        done = {key: future.result() for key, future in futures.items()}
    return {arm: {seed: done[(arm, seed)] for seed in SEEDS} for arm in ("hosfl", "frozen")}


@pytest.fixture(scope="module")
def iid():
    return _curves()


@pytest.mark.slow
def test_no_collapse_after_round_30_on_any_seed(iid):
    for seed, curve in iid["hosfl"].items():
        late = [(r, a) for r, a in curve if r >= STABLE_FROM]
        drops = [(r2, a1 - a2) for (_, a1), (r2, a2) in zip(late, late[1:])]
        assert max(d for _, d in drops) <= MAX_DROP, (seed, [round(a, 3) for _, a in curve])


@pytest.mark.slow
def test_hosfl_beats_the_frozen_client_on_every_seed_iid(iid):
    for seed in SEEDS:
        hosfl, frozen = iid["hosfl"][seed][-1][1], iid["frozen"][seed][-1][1]
        assert hosfl >= frozen + IID_MARGIN, (seed, hosfl, frozen)


@pytest.mark.slow
def test_hosfl_learns_under_dirichlet_skew_and_beats_the_frozen_client():
    curves = _curves(**{"partitioner": "dirichlet", "dirichlet-alpha": 0.3})
    for seed in SEEDS:
        hosfl, frozen = curves["hosfl"][seed][-1][1], curves["frozen"][seed][-1][1]
        assert hosfl >= DIRICHLET_BAR, (seed, [round(a, 3) for _, a in curves["hosfl"][seed]])
        assert hosfl > frozen, (seed, hosfl, frozen)
