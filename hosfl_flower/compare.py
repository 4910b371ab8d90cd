"""``hosfl compare``: run several strategies on the same model, data, partitions, seeds and budget
(rounds, or processed samples) in Flower's simulation engine, and write a report with statistics
over the seeds and plots."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .config import resolve_run_config
from .protocols.registry import protocols
from .round_cost import rounds_for_budget

DEFAULT_STRATEGIES = (
    "hosfl",
    "heron-sfl",
    "splitfed-v2",
    "fedavg",
    "zo-sfl",
    "frozen-client",
    "cse-fsl",
    "fsl-sage",
    "mu-splitfed",
)
ROUND_LINE = re.compile(r"\[(?P<name>[\w-]+)\] round\s+(?P<round>\d+)/(?P<total>\d+)(?P<rest>.*)")


def memory_method(strategy: str) -> str:
    """What one client step of a strategy is, for the memory measurement: its protocol's
    ``memory_step``, or plain inference (the frozen client) when it registers none."""
    return strategy if protocols()[strategy].memory_step is not None else "inference"


def cpus_per_run(jobs: int) -> int | None:
    """The CPUs each of ``jobs`` simulations running at once gives its ClientApp actors: an equal share of this
    machine's, at least one (``None``, every CPU, for one run at a time).

    Without a share every run sizes its actor pool to the whole machine, so ``--jobs 2`` on 2 cores starts 4
    actors, each a process that imports torch and loads the data and the model: measured on 2 cores, the test
    suite's comparison (4 runs, ``--jobs 2``) took about 145 CPU seconds and 77 s, and 90 CPU seconds and 50 s with a share.
    """
    if jobs <= 1:
        return None
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, available // jobs)


def run_strategy(
    strategy: str,
    run_configs: list[str],
    overrides: str,
    results: Path,
    num_supernodes: int,
    label: str,
    num_cpus: int | None = None,
) -> int:
    """Run one strategy with ``flower-simulation`` in a subprocess, showing its progress round by round.

    ``overrides`` (``key=value ...``) are applied after ``run_configs``; the output goes to ``results/run.log``;
    ``num_cpus`` is ``flower-simulation --num-cpus`` (``None``: every CPU).
    """
    command = [
        sys.executable,
        "-m",
        "hosfl_flower.cli",
        "--app",
        "hosfl_flower.app",
        "--num-supernodes",
        str(num_supernodes),
    ]
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    for item in run_configs:
        command += ["--run-config", item]
    command += ["--run-config", f"strategy='{strategy}' results-dir='{results}' {overrides}"]
    from .cli import script_env

    env = script_env()
    started = time.monotonic()
    results.mkdir(parents=True, exist_ok=True)
    log_path = results / "run.log"
    with (
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process,
        open(log_path, "w") as log,
    ):
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            match = ROUND_LINE.search(line)
            if match:
                rest = " | ".join(part.strip() for part in match["rest"].split("|") if part.strip())
                print(f"{label} round {match['round']:>4}/{match['total']}  {rest}", flush=True)
        code = process.wait()
    status = "done" if code == 0 else f"FAILED (exit {code}; log: {log_path})"
    print(f"{label} {status} in {time.monotonic() - started:.0f} s", flush=True)
    return code


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``: distinct non-negative integers, or ``ValueError``."""
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() for item in items):
        raise ValueError(f"--seeds {text!r}: must be comma-separated non-negative integers, e.g. 0,1,2")
    seeds = [int(item) for item in items]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: a seed is repeated")
    return seeds


def parse_budget(text: str) -> int:
    """A positive number of processed training examples, or ``ValueError``."""
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"--budget-samples {text!r}: must be a positive integer (training examples per run)")
    return int(text)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"hosfl compare: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """``hosfl compare``'s command line."""
    parser = _Parser(prog="hosfl", description="hosfl-flower tools")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    compare = commands.add_parser("compare", help=__doc__.splitlines()[0])
    compare.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), help="comma-separated strategies")
    compare.add_argument("--seeds", metavar="S,S,...", help="one run per strategy and seed (default: the run config's seed)")
    compare.add_argument(
        "--budget-samples",
        metavar="N",
        help="give each strategy ceil(N / its samples per round) rounds instead of num-server-rounds",
    )
    compare.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write the report from the runs already in --out (<strategy>/seed-<s>/rounds.jsonl)",
    )
    compare.add_argument("--num-supernodes", type=int, default=10)
    compare.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="simulations run at the same time (a run mostly waits on Flower's message polling, so 2 suit 2 cores)",
    )
    compare.add_argument("--run-config", action="append", default=[], help="shared run config (key=value ... or a .toml file)")
    compare.add_argument("--out", default="reports/compare", help="report directory")
    compare.add_argument("--target-accuracy", type=float, default=0.8)
    compare.add_argument("--no-memory", action="store_true", help="skip the client peak-memory measurement")
    return parser


@dataclass(frozen=True)
class Plan:
    """What a comparison runs: the strategies, the shared run config, the seeds and each strategy's rounds."""

    strategies: list[str]
    shared: dict[str, Any]
    config: dict[str, Any]
    seeds: list[int]
    budget: int | None
    rounds: dict[str, int]

    @property
    def runs(self) -> list[tuple[int, str]]:
        return [(seed, strategy) for seed in self.seeds for strategy in self.strategies]


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the command line into a :class:`Plan` (``ValueError`` — a ``ConfigError`` included — on bad input)."""
    from .cli import _read_overrides

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    registered = protocols()
    unknown = [s for s in strategies if s not in registered]
    if unknown or not strategies:
        raise ValueError(f"--strategies {args.strategies!r}: must be among {', '.join(registered)}")
    shared: dict[str, Any] = {}
    for item in args.run_config:
        shared.update(_read_overrides(item))
    config = resolve_run_config(shared)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [config["seed"]]
    budget = parse_budget(args.budget_samples) if args.budget_samples is not None else None
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: must be a positive integer")
    rounds = {s: rounds_for_budget(s, config, budget) if budget is not None else config["num-server-rounds"] for s in strategies}
    for strategy in strategies:
        for seed in seeds:
            resolve_run_config(shared, {"strategy": strategy, "seed": seed, "num-server-rounds": rounds[strategy]})
    return Plan(strategies, shared, config, seeds, budget, rounds)


def run_all(plan: Plan, args: argparse.Namespace, out: Path) -> set[tuple[str, int]]:
    """Run (or, with ``--report-only``, find) every strategy and seed; return the failed ones."""
    runs = plan.runs
    if args.report_only:  # the runs are already there (a missing one is reported as failed)
        return {(strategy, seed) for seed, strategy in runs if not (out / strategy / f"seed-{seed}" / "rounds.jsonl").is_file()}
    if plan.config["model"].startswith("pretrained-"):
        from .task import model_source  # the checkpoint is built once here (its cost printed), not raced by the runs

        print(f"starting point: {model_source(plan.config)}", flush=True)

    num_cpus = cpus_per_run(min(args.jobs, len(runs)))

    def run(numbered: tuple[int, tuple[int, str]]) -> tuple[str, int] | None:
        number, (seed, strategy) = numbered
        label = f"[{number}/{len(runs)}] {strategy:<14} seed {seed}"
        overrides = f"seed={seed} num-server-rounds={plan.rounds[strategy]}"
        code = run_strategy(
            strategy, args.run_config, overrides, out / strategy / f"seed-{seed}", args.num_supernodes, label, num_cpus
        )
        return (strategy, seed) if code else None

    with ThreadPoolExecutor(args.jobs) as pool:  # each run is its own flower-simulation process
        return {item for item in pool.map(run, enumerate(runs, start=1)) if item is not None}


def collect(plan: Plan, args: argparse.Namespace, out: Path, failed: set[tuple[str, int]]) -> list:
    """Each strategy's runs (and its client peak memory unless ``--no-memory``)."""
    from .report import StrategyResults, load_run

    results = []
    for strategy in plan.strategies:
        runs = [
            load_run(strategy, seed, out / strategy / f"seed-{seed}", args.target_accuracy)
            for seed in plan.seeds
            if (strategy, seed) not in failed
        ]
        if not runs:
            continue
        memory = None
        if not args.no_memory:
            from .memory import measure_client_peak

            memory = int(measure_client_peak(memory_method(strategy), {**plan.shared, "strategy": strategy})["bytes"])
        results.append(StrategyResults(strategy, runs, memory))
    return results


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``hosfl compare ...``."""
    args = build_parser().parse_args(argv)
    try:
        plan = make_plan(args)
    except ValueError as error:  # ConfigError included
        print(f"hosfl compare: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    failed = run_all(plan, args, out)
    results = collect(plan, args, out, failed)
    config = plan.config
    setup = {
        "model": config["model"],
        "cut-layer": config["cut-layer"],
        "dataset": config["dataset"],
        "partitioner": config["partitioner"],
        "rounds": "per strategy (see the budget)" if plan.budget is not None else config["num-server-rounds"],
        "nodes": args.num_supernodes,
        "clients per round": config["clients-per-round"],
        "batch size": config["batch-size"],
    }
    if results:
        from .report import write_report

        report = write_report(out, results, setup, plan.seeds, plan.budget)
        print(f"report: {report}")
        print(next(block for block in report.read_text().split("\n\n") if block.startswith("| strategy")))
    if failed:
        names = ", ".join(f"{strategy} seed {seed}" for strategy, seed in sorted(failed))
        print(f"hosfl compare: failed runs: {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
