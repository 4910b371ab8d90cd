"""Wall time per HO-SFL round through Flower's simulation engine vs the in-process reference loop.

The model is a local 3-block Llama classifier (hidden 256, full fine-tuning, cut after block 2:
a client segment of 2.0 M parameters; none of the named run-config models reaches 1 M). Every node
takes part in every round (3 nodes, 3 per round), so each node replays exactly one ledger entry per
round. Flower's per-round ``seconds`` come from ``rounds.jsonl``; the reference loop's rounds are timed
in this process, once before and once after the Flower runs (their rounds are pooled, so a change in
machine load during the benchmark hits both sides). Warm-up rounds and the last round (which runs the
only central evaluation) are skipped.

    python benchmarks/flower_overhead.py [--quick]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from _common import (
    local_llamas,
    machine,
    parse_args,
    ratio_line,
    run_config_text,
    run_flower_simulation,
    set_threads,
    table,
)

TARGET = 1.2
NODES = 3


def overrides(model: str, rounds: int) -> dict:
    return {
        "model": model,
        "dataset": "sentiment",
        "num-server-rounds": rounds,
        "clients-per-round": NODES,
        "eval-every": 100_000,
        "final-sync": False,
    }


def reference_round_seconds(config: dict) -> list[float]:
    """Per-round wall seconds of :func:`hosfl_flower.reference.run_reference` (timed at each round's sampling)."""
    import hosfl_flower.reference as reference
    from hosfl_flower.schedule import RoundSchedule

    marks: list[float] = []

    class TimedSchedule(RoundSchedule):
        def sample(self, candidates, k):
            marks.append(time.perf_counter())
            return super().sample(candidates, k)

    original = reference.RoundSchedule
    reference.RoundSchedule = TimedSchedule
    try:
        reference.run_reference(config, NODES)
    finally:
        reference.RoundSchedule = original
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


def flower_round_seconds(config: dict, extra_args: tuple[str, ...] = ()) -> tuple[list[float], float]:
    """Per-round ``seconds`` of a ``flower-simulation`` run, and its total wall time."""
    with tempfile.TemporaryDirectory(prefix="hosfl-bench-results-") as results:
        text = run_config_text({**config, "results-dir": results})
        run = run_flower_simulation(NODES, text, extra_args=extra_args)
        if run["returncode"] != 0:
            raise RuntimeError("flower-simulation failed:\n" + run["output"][-3000:])
        rows = [json.loads(line) for line in (Path(results) / "rounds.jsonl").read_text().splitlines()]
    return [row["seconds"] for row in rows], run["seconds"]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    set_threads(1)
    rounds, warmup = (5, 1) if args.quick else (8, 2)
    started = time.perf_counter()
    with local_llamas((256, 1024)) as (path,):
        config = overrides(str(path), rounds)
        from hosfl_flower.config import resolve_run_config
        from hosfl_flower.task import client_task

        cfg = resolve_run_config(config)
        d_c = sum(p.numel() for p in client_task(cfg, NODES).model.client_parameters())
        kept = slice(warmup, rounds - 1)
        reference_seconds = reference_round_seconds(config)[kept]
        variants = [("flower, 2 ClientApp actors (default)", ())]
        if not args.quick:
            variants.append(("flower, 1 ClientApp actor (sequential)", ("--num-cpus-per-client", "2")))
        flower = {name: flower_round_seconds(config, extra) for name, extra in variants}
        reference_seconds += reference_round_seconds(config)[kept]
    reference_median = statistics.median(reference_seconds)
    rows = [("reference loop (in process)", reference_median, "-", 1.0)]
    lines = []
    for name, (seconds, wall) in flower.items():
        median = statistics.median(seconds[kept])
        rows.append((name, median, f"{wall:.0f}", median / reference_median))
        lines.append(ratio_line(f"flower round/reference round [{name}]", median / reference_median, TARGET))
    print(f"HO-SFL round wall time, Flower simulation vs reference loop ({machine()}, 1 torch thread)")
    print(
        f"client segment d_c = {d_c:,}; {NODES} nodes, {NODES} per round, P = {cfg['zo.num-perturbations']}, "
        f"batch {cfg['batch-size']}; "
        f"rounds {warmup + 1}..{rounds - 1} of {rounds}\n"
    )
    print(table(("run", "round s (median)", "process wall s", "/ reference"), rows))
    print(f"({time.perf_counter() - started:.0f} s)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
