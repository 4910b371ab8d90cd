"""``hosfl compare``: run several strategies on the same model, data, partition, seed and round
budget in Flower's simulation engine, and write a report with a table and plots."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import STRATEGIES, ConfigError, resolve_run_config

DEFAULT_STRATEGIES = ("hosfl", "heron-sfl", "splitfed-v2", "fedavg", "zo-sfl", "frozen-client")
ROUND_LINE = re.compile(r"\[(?P<name>[\w-]+)\] round\s+(?P<round>\d+)/(?P<total>\d+)(?P<rest>.*)")
MEMORY_METHOD = {
    "hosfl": "hosfl", "frozen-client": "inference", "heron-sfl": "heron-sfl", "splitfed-v1": "splitfed",
    "splitfed-v2": "splitfed", "zo-sfl": "zo-sfl", "fedavg": "fedavg",
}
"""What one client step of each strategy is, for the memory measurement."""


def run_strategy(strategy: str, run_configs: list[str], results: Path, num_supernodes: int, index: str) -> int:
    """Run one strategy with ``flower-simulation`` in a subprocess, showing its progress round by round."""
    command = [
        sys.executable, "-m", "hosfl_flower.cli", "--app", "hosfl_flower.app", "--num-supernodes", str(num_supernodes),
    ]
    for item in run_configs:
        command += ["--run-config", item]
    command += ["--run-config", f"strategy='{strategy}' results-dir='{results}'"]
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    log_path = results.parent / f"{strategy}.log"
    results.parent.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process, \
            open(log_path, "w") as log:
        for line in process.stdout:
            log.write(line)
            match = ROUND_LINE.search(line)
            if match:
                rest = " | ".join(part.strip() for part in match["rest"].split("|") if part.strip())
                print(f"{index} {strategy:<14} round {match['round']:>4}/{match['total']}  {rest}", flush=True)
        code = process.wait()
    status = "done" if code == 0 else f"FAILED (exit {code}; log: {log_path})"
    print(f"{index} {strategy:<14} {status} in {time.monotonic() - started:.0f} s", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``hosfl compare ...``."""
    parser = argparse.ArgumentParser(prog="hosfl", description="hosfl-flower tools")
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", help=__doc__.splitlines()[0])
    compare.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), help="comma-separated strategies")
    compare.add_argument("--num-supernodes", type=int, default=10)
    compare.add_argument("--run-config", action="append", default=[], help="shared run config (key=value ... or a .toml file)")
    compare.add_argument("--out", default="reports/compare", help="report directory")
    compare.add_argument("--target-accuracy", type=float, default=0.8)
    compare.add_argument("--no-memory", action="store_true", help="skip the client peak-memory measurement")
    args = parser.parse_args(argv)

    from .cli import _read_overrides
    from .report import load_summary, write_report

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown:
            raise ConfigError("strategies", ",".join(unknown), f"must be among {', '.join(STRATEGIES)}")
        shared: dict[str, Any] = {}
        for item in args.run_config:
            shared.update(_read_overrides(item))
        config = resolve_run_config(shared)
    except ConfigError as error:
        print(f"hosfl compare: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    failed = []
    for number, strategy in enumerate(strategies, start=1):
        if run_strategy(strategy, args.run_config, out / strategy, args.num_supernodes, f"[{number}/{len(strategies)}]"):
            failed.append(strategy)
    summaries = []
    for strategy in strategies:
        if strategy in failed:
            continue
        memory = None
        if not args.no_memory:
            from .memory import measure_client_peak

            memory = int(measure_client_peak(MEMORY_METHOD[strategy], {**shared, "strategy": strategy})["bytes"])
        summaries.append(load_summary(strategy, out / strategy, args.target_accuracy, memory))
    setup = {
        "model": config["model"], "cut-layer": config["cut-layer"], "dataset": config["dataset"],
        "partitioner": config["partitioner"], "seed": config["seed"], "rounds": config["num-server-rounds"],
        "nodes": args.num_supernodes, "clients per round": config["clients-per-round"], "batch size": config["batch-size"],
    }
    report = write_report(out, summaries, setup)
    print(f"report: {report}")
    print(report.read_text().split("\n\n")[2])
    if failed:
        print(f"hosfl compare: failed strategies: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
