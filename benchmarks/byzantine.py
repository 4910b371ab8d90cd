"""Bad nodes: final accuracy with one byzantine node of the 3 sampled every round, per protocol, attack
and aggregation rule, over several seeds (in-process reference loop, bundled digits, from scratch).

Arms: the clean run with the mean (the papers'), and each attack (``huge``: values of ±1e11 every
round; ``flip``: the honest update sign-flipped and tripled every round; ``mixed``: both in turn)
under the mean and under a robust rule. Reported: mean ± std of the final test accuracy over the
seeds, and the worst seed's gap to the clean run.

    python benchmarks/byzantine.py [--quick] [--rounds 100] [--seeds 0,1,2]
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from _common import machine, parse_args, table

ROBUST = {"hosfl": "median", "zo-sfl": "median", "splitfed-v2": "median", "heron-sfl": "clipped-mean"}


def run(strategy: str, rounds: int, seed: int, rule: str, mode: str | None) -> tuple[float, float, int]:
    """Final ``(accuracy, loss, skipped rounds)`` of one reference run."""
    from hosfl_flower.reference import run_reference

    cfg = {"strategy": strategy, "num-server-rounds": rounds, "eval-every": rounds, "seed": seed, "aggregation.rule": rule}
    if mode is not None:
        cfg.update({"faults.byzantine-partition": 2, "faults.byzantine-mode": mode})
    last = run_reference(cfg, 3).history
    return last[-1]["accuracy"], last[-1]["loss"], sum(row.get("skipped", 0) for row in last)


def _rule(strategy: str, rule: str) -> str:
    return ROBUST[strategy] if rule == "robust" else rule


def main() -> None:
    def extra(parser) -> None:
        parser.add_argument("--rounds", type=int, default=100)
        parser.add_argument("--seeds", default="0,1,2")
        parser.add_argument("--jobs", type=int, default=2)

    args = parse_args(__doc__.splitlines()[0], extra)
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    rounds = 10 if args.quick else args.rounds
    arms = [("mean", None)] + [(rule, mode) for mode in ("huge", "flip", "mixed") for rule in ("mean", "robust")]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {
            (strategy, rule, mode, seed): pool.submit(run, strategy, rounds, seed, _rule(strategy, rule), mode)
            for strategy in ROBUST
            for rule, mode in arms
            for seed in seeds
        }
        results = {key: future.result() for key, future in futures.items()}
    rows = []
    for strategy, robust in ROBUST.items():
        clean = [results[(strategy, "mean", None, seed)][0] for seed in seeds]
        for rule, mode in arms:
            accuracy = [results[(strategy, rule, mode, seed)][0] for seed in seeds]
            skipped = sum(results[(strategy, rule, mode, seed)][2] for seed in seeds)
            spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
            worst = max(c - a for c, a in zip(clean, accuracy))
            name = robust if rule == "robust" else rule
            summary = f"{statistics.mean(accuracy):.3f} ± {spread:.3f}"
            rows.append((strategy, mode or "none", name, summary, f"{worst:+.3f}", skipped))
    print(f"one byzantine node of 3, {rounds} rounds, seeds {seeds} ({machine()})\n")
    print(table(("protocol", "attack", "rule", "final accuracy", "worst gap to clean", "skipped"), rows))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
