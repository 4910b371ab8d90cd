"""1 000 simulated nodes, 10 per round, 20 rounds on 2 cores; ServerApp memory at 100 vs 1 000 nodes.

Each run is ``flower-simulation`` in its own process group; the simulation process (which runs the
ServerApp and the simulation engine's node bookkeeping; ClientApps run in Ray actors) has its resident
set polled from ``/proc`` while it runs. Its peak (``VmHWM``) at 1 000 nodes over that at 100 nodes
shows what more nodes cost the server.

    python benchmarks/scale.py [--quick]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from _common import machine, mib, parse_args, ratio_line, run_config_text, run_flower_simulation, table

PER_ROUND, ROUNDS = 10, 20


def run(nodes: int, rounds: int) -> dict:
    """One HO-SFL simulation with ``nodes`` nodes; its rounds, wall time and the process's memory."""
    with tempfile.TemporaryDirectory(prefix="hosfl-bench-results-") as results:
        config = {
            "clients-per-round": PER_ROUND,
            "num-server-rounds": rounds,
            "final-sync": False,
            "eval-every": 5,
            "results-dir": results,
        }
        outcome = run_flower_simulation(nodes, run_config_text(config), timeout=1200)
        path = Path(results) / "rounds.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if outcome["returncode"] != 0:
        raise RuntimeError(f"flower-simulation with {nodes} nodes failed:\n" + outcome["output"][-3000:])
    return {**outcome, "rows": rows}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    sizes, rounds = ((50, 200), 3) if args.quick else ((100, 1000), ROUNDS)
    started = time.perf_counter()
    results = {nodes: run(nodes, rounds) for nodes in sizes}
    print(f"HO-SFL at scale: {PER_ROUND} nodes per round, {rounds} rounds, final-sync off ({machine()})\n")
    rows = []
    for nodes, r in results.items():
        last = r["rows"][-1] if r["rows"] else {}
        round_seconds = sorted(row["seconds"] for row in r["rows"])
        rows.append(
            (
                nodes,
                len(r["rows"]),
                f"{last.get('accuracy', float('nan')):.3f}",
                round_seconds[len(round_seconds) // 2],
                r["seconds"],
                mib(r["peak_rss"]),
                mib(r["last_rss"]),
            )
        )
    print(table(("nodes", "rounds done", "final acc", "round s (median)", "wall s", "peak RSS MiB", "last RSS MiB"), rows))
    small, large = (results[n] for n in sizes)
    per_node = (large["peak_rss"] - small["peak_rss"]) / (sizes[1] - sizes[0])
    print(f"\nserver memory per extra node: {per_node / 1024:.1f} KiB (peak RSS difference / node difference)")
    print(f"({time.perf_counter() - started:.0f} s)")
    print(f"completed {sizes[1]} nodes x {rounds} rounds: {'yes' if len(large['rows']) == rounds else 'NO'}")
    print(ratio_line(f"server peak RSS {sizes[1]} nodes / {sizes[0]} nodes", large["peak_rss"] / small["peak_rss"]))
    print(ratio_line(f"server last RSS {sizes[1]} nodes / {sizes[0]} nodes", large["last_rss"] / small["last_rss"]))


if __name__ == "__main__":
    main()
