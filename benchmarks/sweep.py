"""Multi-seed sweep of HO-SFL settings on the in-process reference loop (the same numbers as a Flower run).

Each grid point is a set of run-config overrides; every point runs on every seed, and the table gives
the mean ± std (ddof=1) of the final accuracy, the worst seed, the largest drop between consecutive
evaluations after round 30, and, per seed, the margin over the frozen client (the same point with
``zo.num-perturbations=0``). Rows are also appended as JSON lines to ``--jsonl`` for later tables.

    python benchmarks/sweep.py --rounds 100 --seeds 0,1,2,3,4 \\
        --grid "zo.clip-grad-norm=0" --grid "zo.clip-grad-norm=5"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hosfl_flower.config import parse_run_config_overrides, resolve_run_config  # noqa: E402

STABLE_AFTER = 30
"""Drops between consecutive evaluations are counted from this round on."""


def run_point(overrides: dict[str, Any], num_partitions: int) -> dict[str, Any]:
    """One reference run; returns its evaluations."""
    from hosfl_flower.reference import run_reference

    result = run_reference(overrides, num_partitions)
    evaluated = [(row["round"], row["accuracy"]) for row in result.history if "accuracy" in row]
    return {"overrides": overrides, "evaluations": evaluated}


def max_drop(evaluations: list[tuple[int, float]], after: int = STABLE_AFTER) -> float:
    """The largest fall of accuracy from one evaluation to the next, both after round ``after``."""
    drops = [a - b for (r, a), (_, b) in zip(evaluations, evaluations[1:]) if r >= after]
    return max(drops, default=0.0)


def summarise(label: str, runs: list[dict[str, Any]], frozen: dict[int, float] | None) -> str:
    """One markdown row: mean ± std, worst seed, max drop, margin over the frozen client."""
    finals = {run["overrides"]["seed"]: run["evaluations"][-1][1] for run in runs}
    values = list(finals.values())
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    worst = min(finals, key=finals.get)
    drop = max(max_drop(run["evaluations"]) for run in runs)
    margin = "—"
    if frozen:
        margin = f"{min(finals[s] - frozen[s] for s in finals if s in frozen):+.3f}"
    return (
        f"| {label} | {statistics.fmean(values):.3f} ± {std:.3f} | {finals[worst]:.3f} (seed {worst}) | {drop:.3f} | {margin} |"
    )


def frozen_point(overrides: dict[str, Any]) -> dict[str, Any]:
    """The frozen-client ablation of a point: ``P = 0``, without the keys that only affect the client step."""
    kept = {k: v for k, v in overrides.items() if not k.startswith(("zo.", "client."))}
    return {**kept, "zo.num-perturbations": 0}


def _key(overrides: dict[str, Any]) -> str:
    return json.dumps(sorted(overrides.items()))


def _label(overrides: dict[str, Any], base: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items() if base.get(k) != v) or "base"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", action="append", required=True, help="run-config overrides of one grid point")
    parser.add_argument("--base", default="", help="overrides shared by every point")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--num-partitions", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jsonl", default="", help="append every run as a JSON line to this file")
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    base = {"num-server-rounds": args.rounds, "eval-every": args.eval_every, **parse_run_config_overrides(args.base)}
    points = [(text, {**base, **parse_run_config_overrides(text)}) for text in args.grid]
    for _, overrides in points:
        resolve_run_config(overrides)  # a bad value stops the sweep before anything runs
    frozen_points = {text: frozen_point(o) for text, o in points}
    unique: dict[str, dict[str, Any]] = {}
    for o in [*(o for _, o in points), *frozen_points.values()]:
        for s in seeds:
            unique.setdefault(_key({**o, "seed": s}), {**o, "seed": s})
    with ProcessPoolExecutor(args.workers) as pool:
        futures = {key: pool.submit(run_point, o, args.num_partitions) for key, o in unique.items()}
        runs = {key: f.result() for key, f in futures.items()}
    if args.jsonl:
        with open(args.jsonl, "a") as out:
            for run in runs.values():
                out.write(json.dumps(run) + "\n")
    print(f"rounds {args.rounds}, seeds {seeds}, base: {args.base or '(defaults)'}\n")
    print("| point | final accuracy (mean ± std) | worst seed | max drop after round 30 | min margin over frozen |")
    print("|---|---|---|---|---|")
    frozen_rows: dict[str, str] = {}
    for text, o in points:
        frozen_runs = [runs[_key({**frozen_points[text], "seed": s})] for s in seeds]
        frozen = {run["overrides"]["seed"]: run["evaluations"][-1][1] for run in frozen_runs}
        print(summarise(text, [runs[_key({**o, "seed": s})] for s in seeds], frozen))
        frozen_label = f"frozen client ({_label(frozen_points[text], base)})"
        frozen_rows.setdefault(_key(frozen_points[text]), summarise(frozen_label, frozen_runs, None))
    for row in frozen_rows.values():
        print(row)


if __name__ == "__main__":
    main()
