"""The comparison report: a table per strategy and plots, from the ``rounds.jsonl`` files of runs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .accounting import CATEGORIES
from .recording import human_bytes


@dataclass
class StrategySummary:
    """One strategy's run, summarised."""

    strategy: str
    rows: list[dict[str, Any]]
    target: float
    peak_memory: int | None = None
    evaluated: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.evaluated = [row for row in self.rows if "accuracy" in row]

    @property
    def final_accuracy(self) -> float:
        return self.evaluated[-1]["accuracy"] if self.evaluated else float("nan")

    @property
    def best_accuracy(self) -> float:
        return max((row["accuracy"] for row in self.evaluated), default=float("nan"))

    @property
    def rounds_to_target(self) -> int | None:
        return next((row["round"] for row in self.evaluated if row["accuracy"] >= self.target), None)

    def total(self, key: str) -> float:
        return sum(row.get(key, 0) for row in self.rows)

    @property
    def bytes_per_round(self) -> float:
        return self.total("bytes.total") / max(len(self.rows), 1)

    def cumulative_bytes(self) -> list[tuple[float, float]]:
        """``(cumulative bytes, accuracy)`` at each evaluated round."""
        points, running = [], 0.0
        for row in self.rows:
            running += row.get("bytes.total", 0)
            if "accuracy" in row:
                points.append((running, row["accuracy"]))
        return points


def load_summary(strategy: str, results_dir: Path, target: float, peak_memory: int | None = None) -> StrategySummary:
    """Read ``results_dir/rounds.jsonl``."""
    rows = [json.loads(line) for line in (results_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    return StrategySummary(strategy, rows, target, peak_memory)


def write_report(out: Path, summaries: Sequence[StrategySummary], setup: Mapping[str, Any]) -> Path:
    """Write ``report.md`` and the PNG plots into ``out``; return the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plot(out, summaries)
    target = summaries[0].target if summaries else 0.0
    lines = ["# Strategy comparison", "", "Setup: " + ", ".join(f"{k} = {v}" for k, v in setup.items()), ""]
    header = [
        "strategy", "final acc", "best acc", f"rounds to {target:.0%}", "total bytes", "bytes / round",
        "client compute (s)", "server compute (s)", "client peak memory",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [
            s.strategy,
            f"{s.final_accuracy:.4f}",
            f"{s.best_accuracy:.4f}",
            str(s.rounds_to_target) if s.rounds_to_target is not None else "not reached",
            human_bytes(s.total("bytes.total")),
            human_bytes(s.bytes_per_round),
            f"{s.total('client-seconds'):.2f}",
            f"{s.total('server-seconds'):.2f}",
            human_bytes(s.peak_memory) if s.peak_memory is not None else "not measured",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Total bytes per category (both directions, every record of every message):", ""]
    lines += ["| strategy | " + " | ".join(CATEGORIES) + " |", "|" + "---|" * (len(CATEGORIES) + 1)]
    for s in summaries:
        lines.append(f"| {s.strategy} | " + " | ".join(human_bytes(s.total(f"bytes.{c}")) for c in CATEGORIES) + " |")
    lines += ["", "Client peak memory: one client step, measured in an isolated process (see BENCHMARKS.md).", ""]
    lines += [f"![{title}]({name})" for name, title in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plot(out: Path, summaries: Sequence[StrategySummary]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        ax.plot([r["round"] for r in s.evaluated], [r["accuracy"] for r in s.evaluated], label=s.strategy, marker=".")
    ax.set(xlabel="round", ylabel="test accuracy", title="Accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_round.png", dpi=120)
    plt.close(fig)
    made.append(("accuracy_vs_round.png", "accuracy vs round"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        points = s.cumulative_bytes()
        ax.plot([p[0] for p in points], [p[1] for p in points], label=s.strategy, marker=".")
    ax.set_xscale("log")
    ax.set(xlabel="cumulative bytes (log scale)", ylabel="test accuracy", title="Accuracy per byte")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bytes.png", dpi=120)
    plt.close(fig)
    made.append(("accuracy_vs_bytes.png", "accuracy vs cumulative bytes"))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(len(summaries), 1)
    for index, s in enumerate(summaries):
        values = [s.total(f"bytes.{category}") for category in CATEGORIES]
        positions = [c + index * width for c in range(len(CATEGORIES))]
        ax.bar(positions, values, width=width, label=s.strategy)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(CATEGORIES))], CATEGORIES, rotation=25, ha="right")
    ax.set_yscale("log")
    ax.set(ylabel="bytes over the run (log scale)", title="Bytes per category")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bytes_per_category.png", dpi=120)
    plt.close(fig)
    made.append(("bytes_per_category.png", "bytes per category per strategy"))
    return made
