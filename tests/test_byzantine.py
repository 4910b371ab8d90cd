"""One byzantine node of the 3 sampled every round (``faults.byzantine-partition``): in Flower simulation
for HO-SFL (test_workloads.py::test_flower_applies_and_defends_the_attack_as_the_reference_loop, in the
tiny-resnet run it shares) and ZO-SFL, SplitFed V2 and HERON-SFL (test_strategies.py) the attack is applied and
defended exactly as in the in-process reference loop; there, over a longer run, the mean never lets a non-finite value in nor
aborts, and a robust rule keeps the accuracy near the run without the attacker.

``mixed`` attacks with in-bound values of ±1e11 on odd rounds (the reply bound rejects them) and with
the honest update sign-flipped and tripled on even rounds (plausible: it passes the bound, and only
the rule can resist it). Bars and the measured numbers are in BENCHMARKS.md ("Bad nodes").
"""

import math
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from hosfl_flower.reference import run_reference

PROTOCOLS = ("hosfl", "zo-sfl", "splitfed-v2", "heron-sfl")
ATTACK = {"faults.byzantine-partition": 2, "faults.byzantine-mode": "mixed"}
ROUNDS = 100  # long enough for the attacked runs to reach the clean runs' plateau (BENCHMARKS.md, "Bad nodes")
SEEDS = (0, 1)
ROBUST = {"hosfl": "median", "zo-sfl": "median", "splitfed-v2": "median", "heron-sfl": "clipped-mean"}
MAX_GAP = {"hosfl": 0.03, "heron-sfl": 0.03, "splitfed-v2": 0.08}
"""Bars on the mean over SEEDS of (clean accuracy − attacked accuracy). SplitFed V2's coordinate-wise median of
two honest states and a flipped one learns more slowly, by an amount that varies with the CPU's arithmetic: the
mean gap over seeds 0, 1 was +0.013 on one machine and +0.051 on another; there, over seeds 0–4, +0.017 ± 0.040,
worst seed +0.075 (under the mean the same attack costs it about 0.28)."""
MAX_LOSS_GAP = 0.02  # ZO-SFL stays near chance in 100 rounds from scratch, so its bar is on the test loss (+0.003)
ZO_SFL_ROUNDS = 40  # ... and a shorter run shows that as well (BENCHMARKS.md: 0.12 ± 0.03 after 100 rounds, clean)
MEAN_ROUNDS = 30


def _finite(model) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def _run(strategy: str, rounds: int, overrides: dict) -> tuple[float, float, bool, int]:
    cfg = {"strategy": strategy, "num-server-rounds": rounds, "eval-every": rounds, **overrides}
    result = run_reference(cfg, 3)
    last = result.history[-1]
    return last["accuracy"], last["loss"], _finite(result.model), sum(row.get("skipped", 0) for row in result.history)


@pytest.fixture(scope="module")
def runs():
    jobs = {}
    for strategy in PROTOCOLS:
        for seed in SEEDS:
            rounds = ZO_SFL_ROUNDS if strategy == "zo-sfl" else ROUNDS
            jobs[(strategy, "clean", seed)] = (rounds, {"seed": seed})
            jobs[(strategy, "robust", seed)] = (rounds, {"seed": seed, "aggregation.rule": ROBUST[strategy], **ATTACK})
        jobs[(strategy, "mean", 0)] = (MEAN_ROUNDS, {"aggregation.rule": "mean", **ATTACK})
    with ProcessPoolExecutor(2) as pool:
        futures = {key: pool.submit(_run, key[0], *job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", PROTOCOLS)
def test_with_the_mean_the_model_stays_finite_and_the_run_goes_on(runs, strategy):
    accuracy, loss, finite, skipped = runs[(strategy, "mean", 0)]
    assert finite and skipped == 0 and math.isfinite(loss), (accuracy, loss)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", PROTOCOLS)
def test_a_robust_rule_keeps_the_accuracy_of_the_run_without_the_attacker(runs, strategy):
    clean = [runs[(strategy, "clean", seed)] for seed in SEEDS]
    attacked = [runs[(strategy, "robust", seed)] for seed in SEEDS]
    assert all(run[2] and run[3] == 0 for run in attacked), attacked
    if strategy == "zo-sfl":
        gap = sum(a[1] - c[1] for c, a in zip(clean, attacked)) / len(SEEDS)
        assert gap <= MAX_LOSS_GAP, (clean, attacked)
    else:
        gap = sum(c[0] - a[0] for c, a in zip(clean, attacked)) / len(SEEDS)
        assert gap <= MAX_GAP[strategy], (strategy, clean, attacked)
