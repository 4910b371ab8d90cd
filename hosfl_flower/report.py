"""The comparison report: per strategy, each metric as mean ± standard deviation over seeds, the worst
seed, and band plots, from the ``rounds.jsonl`` files of the runs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .accounting import CATEGORIES, CUT_CATEGORIES, WEIGHT_CATEGORIES
from .recording import human_bytes


@dataclass
class RunSummary:
    """One run (one strategy, one seed), summarised from its rows."""

    strategy: str
    seed: int
    rows: list[dict[str, Any]]
    target: float
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

    @property
    def rounds(self) -> int:
        return len(self.rows)

    def total(self, key: str) -> float:
        return sum(row.get(key, 0) for row in self.rows)

    def per_round(self, key: str) -> float:
        return self.total(key) / max(self.rounds, 1)

    def accuracy_curve(self, key: str | None) -> dict[int, tuple[float, float]]:
        """Evaluated round → (round, or the cumulative sum of ``key`` up to it; accuracy)."""
        points, running = {}, 0.0
        for row in self.rows:
            running += row.get(key, 0) if key else 0
            if "accuracy" in row:
                points[row["round"]] = (running if key else float(row["round"]), row["accuracy"])
        return points


def load_run(strategy: str, seed: int, results_dir: Path, target: float) -> RunSummary:
    """Read ``results_dir/rounds.jsonl``."""
    rows = [json.loads(line) for line in (results_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    return RunSummary(strategy, seed, rows, target)


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof=1) of ``count`` values; ``std`` is ``None`` for one value."""

    mean: float
    std: float | None
    count: int


def spread(values: Sequence[float]) -> Spread:
    """:class:`Spread` of ``values`` (at least one)."""
    array = np.asarray(values, dtype=float)
    return Spread(float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else None, int(array.size))


def worst_run(runs: Sequence[RunSummary]) -> RunSummary:
    """The run with the lowest final accuracy (a run without one counts as lowest; ties: the first)."""
    return min(runs, key=lambda r: -math.inf if math.isnan(r.final_accuracy) else r.final_accuracy)


def accuracy_band(runs: Sequence[RunSummary], key: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(x, mean accuracy, std of accuracy or None)`` over ``runs`` at each round all of them evaluated.

    ``x`` is the round (``key=None``) or the mean over the runs of the cumulative ``key`` up to that round.
    """
    curves = [run.accuracy_curve(key) for run in runs]
    rounds = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    xs = np.array([[c[r][0] for r in rounds] for c in curves], dtype=float).reshape(len(curves), len(rounds))
    ys = np.array([[c[r][1] for r in rounds] for c in curves], dtype=float).reshape(len(curves), len(rounds))
    std = ys.std(axis=0, ddof=1) if len(runs) > 1 else None
    return xs.mean(axis=0), ys.mean(axis=0), std


@dataclass
class StrategyResults:
    """One strategy's runs, one per seed, and its client peak memory (seed-independent)."""

    strategy: str
    runs: list[RunSummary]
    peak_memory: int | None = None

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]

    def spread(self, value: Callable[[RunSummary], float | None]) -> Spread | None:
        """:class:`Spread` of ``value`` over the runs that have one (``None`` if none has)."""
        values = [v for v in (value(run) for run in self.runs) if v is not None]
        return spread(values) if values else None

    def mean(self, value: Callable[[RunSummary], float]) -> float:
        return float(np.mean([value(run) for run in self.runs]))


@dataclass(frozen=True)
class Metric:
    """A column of the main table: a value per run, shown as mean ± std over the seeds."""

    header: str
    value: Callable[[RunSummary], float | None]
    show: Callable[[float], str]


def metrics(target: float) -> list[Metric]:
    """The columns reported as mean ± std."""
    accuracy, seconds = "{:.4f}".format, "{:.3f}".format
    return [
        Metric("final acc", lambda r: r.final_accuracy, accuracy),
        Metric("best acc", lambda r: r.best_accuracy, accuracy),
        Metric(f"rounds to {target:.0%}", lambda r: r.rounds_to_target, plain),
        Metric("total bytes", lambda r: r.total("bytes.total"), human_bytes),
        Metric("bytes / round", lambda r: r.per_round("bytes.total"), human_bytes),
        Metric("client compute (s)", lambda r: r.total("client-seconds"), seconds),
        Metric("server compute (s)", lambda r: r.total("server-seconds"), seconds),
    ]


PROTOCOL_COLUMNS: tuple[tuple[str, Callable[[RunSummary], float]], ...] = (
    ("rounds", lambda r: r.rounds),
    ("samples", lambda r: r.total("samples")),
    ("server steps / round", lambda r: r.per_round("server-steps")),
)
"""Columns shown as the mean over seeds: what the protocol did, which the seed does not change
unless replies were rejected."""


def spread_cell(value: Spread | None, show: Callable[[float], str], seeds: int) -> str:
    """``mean ± std``; the value alone for one seed; ``(k/n seeds)`` when only ``k`` runs have one."""
    if value is None:
        return "not reached"
    text = show(value.mean) if value.std is None else f"{show(value.mean)} ± {show(value.std)}"
    return text if value.count == seeds else f"{text} ({value.count}/{seeds} seeds)"


def plain(value: float) -> str:
    """An integral value as an integer, any other with two decimals."""
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def _intro(results: Sequence[StrategyResults], setup: Mapping[str, Any], seeds: Sequence[int], budget: int | None) -> list[str]:
    lines = ["# Strategy comparison", "", "Setup: " + ", ".join(f"{k} = {v}" for k, v in setup.items()), ""]
    seed_list = ", ".join(str(s) for s in seeds)
    if len(seeds) == 1:
        lines += [f"Seeds: 1 (seed {seed_list}); each cell is that run's value.", ""]
    else:
        lines += [
            f"Seeds: {len(seeds)} ({seed_list}). Each cell is the mean ± sample standard deviation (ddof=1) over "
            "the seeds; rounds, samples and server steps / round are means. Worst seed: the seed with the lowest "
            "final accuracy, and that accuracy.",
            "",
        ]
    if budget is not None:
        rounds = ", ".join(f"{r.strategy} {plain(r.mean(lambda run: run.rounds))}" for r in results)
        lines += [
            f"Budget: {budget} processed training examples per run; each strategy runs "
            f"ceil({budget} / samples per round) rounds: {rounds}.",
            "",
        ]
    return lines


def _main_table(results: Sequence[StrategyResults], seeds: Sequence[int]) -> list[str]:
    columns = metrics(results[0].runs[0].target if results else 0.0)
    header = [
        "strategy",
        *(name for name, _ in PROTOCOL_COLUMNS),
        *(m.header for m in columns),
        "worst seed (final acc)",
        "client peak memory",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        name = r.strategy if len(r.runs) == len(seeds) else f"{r.strategy} ({len(r.runs)}/{len(seeds)} seeds)"
        worst = worst_run(r.runs)
        cells = [
            name,
            *(plain(r.mean(value)) for _, value in PROTOCOL_COLUMNS),
            *(spread_cell(r.spread(m.value), m.show, len(r.runs)) for m in columns),
            f"{worst.seed} ({worst.final_accuracy:.4f})",
            human_bytes(r.peak_memory) if r.peak_memory is not None else "not measured",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _category_table(results: Sequence[StrategyResults]) -> list[str]:
    lines = ["", "Total bytes per category (both directions, every record of every message; mean over seeds):", ""]
    lines += ["| strategy | " + " | ".join(CATEGORIES) + " |", "|" + "---|" * (len(CATEGORIES) + 1)]
    for r in results:
        lines.append(f"| {r.strategy} | " + " | ".join(human_bytes(r.mean(_category(c))) for c in CATEGORIES) + " |")
    lines += [
        "",
        "Cut traffic (" + ", ".join(CUT_CATEGORIES) + ") against weight traffic (" + ", ".join(WEIGHT_CATEGORIES) + "), "
        "and the averaging of per-client server copies as the papers count it (each copy up and the average down, "
        "not in the totals: here the copies live in the server's process). Mean over seeds:",
        "",
        "| strategy | cut traffic | weight traffic | server-side averaging |",
        "|---|---|---|---|",
    ]
    for r in results:
        cells = (human_bytes(r.mean(_category(c))) for c in ("cut", "weights", "server_averaging"))
        lines.append(f"| {r.strategy} | " + " | ".join(cells) + " |")
    return lines


def write_report(
    out: Path,
    results: Sequence[StrategyResults],
    setup: Mapping[str, Any],
    seeds: Sequence[int],
    budget_samples: int | None = None,
) -> Path:
    """Write ``report.md`` and the PNG plots into ``out``; return the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plot(out, results)
    lines = _intro(results, setup, seeds, budget_samples) + _main_table(results, seeds) + _category_table(results)
    lines += [
        "",
        "samples: training examples the clients processed over the run; server steps: optimizer steps on the "
        "server segment. Client peak memory: one client step, measured once per strategy in an isolated "
        "process (see BENCHMARKS.md).",
        "",
        "Plots: test accuracy, mean over seeds at each evaluated round with a band of ± one standard deviation, "
        "against the round and against the mean cumulative processed samples, bytes and client compute seconds.",
        "",
    ]
    lines += [f"![{title}]({name})" for name, title in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _category(category: str) -> Callable[[RunSummary], float]:
    return lambda run: run.total(f"bytes.{category}")


BAND_PLOTS: tuple[tuple[str, str | None, str, str, bool], ...] = (
    ("accuracy_vs_round.png", None, "round", "accuracy vs round", False),
    ("accuracy_vs_samples.png", "samples", "cumulative processed samples", "accuracy vs processed samples", False),
    ("accuracy_vs_bytes.png", "bytes.total", "cumulative bytes (log scale)", "accuracy vs cumulative bytes", True),
    (
        "accuracy_vs_client_compute.png",
        "client-seconds",
        "cumulative client compute (s)",
        "accuracy vs cumulative client compute",
        False,
    ),
)
"""``(file, row key summed along x or None for the round, x label, title, log x)`` of each band plot."""


def _plot(out: Path, results: Sequence[StrategyResults]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for name, key, xlabel, title, log_x in BAND_PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in results:
            x, mean, std = accuracy_band(r.runs, key)
            (line,) = ax.plot(x, mean, label=r.strategy, marker=".")
            if std is not None:
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        if log_x:
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel="test accuracy (mean ± std over seeds)", title=title.capitalize())
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        made.append((name, title))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(len(results), 1)
    for index, r in enumerate(results):
        values = [r.mean(_category(category)) for category in CATEGORIES]
        positions = [c + index * width for c in range(len(CATEGORIES))]
        ax.bar(positions, values, width=width, label=r.strategy)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(CATEGORIES))], CATEGORIES, rotation=25, ha="right")
    ax.set_yscale("log")
    ax.set(ylabel="bytes over the run (log scale)", title="Bytes per category (mean over seeds)")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bytes_per_category.png", dpi=120)
    plt.close(fig)
    made.append(("bytes_per_category.png", "bytes per category per strategy"))
    return made
