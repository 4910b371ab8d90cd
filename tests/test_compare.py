"""``hosfl compare``: strategies × seeds in simulation, statistics over the seeds, band plots, budgets of
processed samples, and the per-protocol round costs."""

import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from hosfl_flower.compare import main
from hosfl_flower.config import resolve_run_config
from hosfl_flower.protocols.heron.messages import upload_steps
from hosfl_flower.report import RunSummary, StrategyResults, accuracy_band, spread, worst_run, write_report
from hosfl_flower.round_cost import rounds_for_budget, samples_per_round, server_steps_per_round

from .conftest import BIN, ROOT, subprocess_env

PLOTS = (
    "accuracy_vs_round.png",
    "accuracy_vs_samples.png",
    "accuracy_vs_bytes.png",
    "accuracy_vs_client_compute.png",
    "bytes_per_category.png",
)
UNITS = {"B": 1.0, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def _compare(out, *args: str) -> subprocess.CompletedProcess:
    process = subprocess.run(
        [str(BIN / "hosfl"), "compare", "--out", str(out), *args],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return process


def _table(report: str) -> dict[str, dict[str, str]]:
    """The main table of ``report.md``: strategy → column header → cell."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| strategy | rounds |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    table = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(header, cells))
    return table


def _number(text: str) -> tuple[float, float]:
    """A shown number (``0.1234``, ``34.5 kB``) and half a unit of its last digit."""
    value, _, unit = text.strip().partition(" ")
    scale = UNITS[unit] if unit else 1.0
    decimals = len(value.partition(".")[2])
    return float(value) * scale, 0.5 * 10.0**-decimals * scale * (1 + 1e-9)


def _assert_mean_std(cell: str, values: list[float]) -> None:
    """``cell`` is ``mean ± std`` of ``values`` (numpy, sample std) to the digits it shows."""
    mean_text, std_text = cell.split(" ± ")
    (mean, mean_tol), (std, std_tol) = _number(mean_text), _number(std_text)
    assert abs(mean - np.mean(values)) <= mean_tol, (cell, values)
    assert abs(std - np.std(values, ddof=1)) <= std_tol, (cell, values)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]


SEEDS, BUDGET = [1, 4], 48
SHARED = "clients-per-round=2 batch-size=8 heron.local-steps=2 heron.upload-every=1 eval-every=1"
SHARED_CONFIG = {"clients-per-round": 2, "batch-size": 8, "heron.local-steps": 2, "heron.upload-every": 1}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One ``hosfl compare`` run (HO-SFL and HERON-SFL × seeds 1, 4 at a sample budget) that both report tests
    read: the multi-seed report it writes, and a single-seed report rebuilt from its runs (``--report-only``)."""
    out = tmp_path_factory.mktemp("compare") / "report"
    process = _compare(
        out,
        "--strategies",
        "hosfl,heron-sfl",
        "--seeds",
        "1,4",
        "--budget-samples",
        str(BUDGET),
        "--num-supernodes",
        "4",
        "--run-config",
        SHARED,
        "--target-accuracy",
        "0.1",
        "--no-memory",
        "--jobs",
        "2",
    )
    return process, out


@pytest.mark.slow
def test_compare_one_seed_writes_a_report_with_numbers(compared, tmp_path):
    process, runs_out = compared
    config = resolve_run_config(SHARED_CONFIG)
    rounds = {s: rounds_for_budget(s, config, BUDGET) for s in ("hosfl", "heron-sfl")}
    # what the runs themselves wrote: progress lines with the test accuracy, each run's rows, model and log
    assert re.search(r"\[1/4\] hosfl +seed 1 round +3/3 +test acc", process.stdout)
    for strategy, count in rounds.items():
        for seed in SEEDS:
            run = runs_out / strategy / f"seed-{seed}"
            assert len(_rows(run)) == count and (run / "final-model.pt").is_file()
            assert f"round {count}/{count}" in (run / "run.log").read_text()
    # a report of one seed (the run config's: no --seeds), rebuilt from those runs, with the memory measured
    out = tmp_path / "report"
    shutil.copytree(runs_out, out)
    for name in ("report.md", *PLOTS):
        (out / name).unlink(missing_ok=True)
    assert (
        main(
            [
                "compare",
                "--out",
                str(out),
                "--strategies",
                "hosfl,heron-sfl",
                "--budget-samples",
                str(BUDGET),
                "--run-config",
                f"{SHARED} seed=4",
                "--target-accuracy",
                "0.05",
                "--num-supernodes",
                "4",
                "--report-only",
            ]
        )
        == 0
    )
    report = (out / "report.md").read_text()
    assert "Seeds: 1 (seed 4)" in report
    table = _table(report)
    for strategy, count in rounds.items():
        cells = table[strategy]
        assert "±" not in cells["final acc"] and float(cells["final acc"]) > 0
        assert cells["final acc"] == f"{_rows(out / strategy / 'seed-4')[-1]['accuracy']:.4f}"
        assert cells["rounds to 5%"] == "1" and cells["worst seed (final acc)"] == f"4 ({cells['final acc']})"
        assert cells["total bytes"].endswith("B") and cells["client peak memory"].endswith("B")
        assert cells["server steps / round"] == str(server_steps_per_round(strategy, config))
        assert cells["samples"] == str(count * samples_per_round(strategy, config))
    for plot in PLOTS:
        assert (out / plot).read_bytes()[:4] == b"\x89PNG" and f"]({plot})" in report


@pytest.mark.slow
def test_compare_over_seeds_at_a_sample_budget(compared):
    process, out = compared
    seeds, budget, shared = SEEDS, BUDGET, SHARED
    assert re.search(r"\[4/4\] heron-sfl +seed 4 round +2/2", process.stdout)
    report = (out / "report.md").read_text()
    assert "Seeds: 2 (1, 4)" in report and "ddof=1" in report
    config = resolve_run_config(SHARED_CONFIG)
    expected_rounds = {s: rounds_for_budget(s, config, budget) for s in ("hosfl", "heron-sfl")}
    assert expected_rounds == {"hosfl": 3, "heron-sfl": 2}  # 16 and 32 samples per round
    assert f"Budget: {budget} processed training examples" in report and "hosfl 3, heron-sfl 2" in report
    table = _table(report)
    for strategy, rounds in expected_rounds.items():
        runs = {seed: _rows(out / strategy / f"seed-{seed}") for seed in seeds}
        for seed, rows in runs.items():
            assert json.loads((out / strategy / f"seed-{seed}" / "summary.json").read_text())["config"]["seed"] == seed
            assert len(rows) == rounds
            assert [r["samples"] for r in rows] == [samples_per_round(strategy, config)] * rounds
            assert [r["server-steps"] for r in rows] == [server_steps_per_round(strategy, config)] * rounds
        cells = table[strategy]
        assert cells["rounds"] == str(rounds) and cells["samples"] == str(rounds * samples_per_round(strategy, config))
        final = {seed: rows[-1]["accuracy"] for seed, rows in runs.items()}
        _assert_mean_std(cells["final acc"], list(final.values()))
        _assert_mean_std(cells["best acc"], [max(r["accuracy"] for r in rows) for rows in runs.values()])
        _assert_mean_std(cells["total bytes"], [sum(r["bytes.total"] for r in rows) for rows in runs.values()])
        _assert_mean_std(cells["client compute (s)"], [sum(r["client-seconds"] for r in rows) for rows in runs.values()])
        _assert_mean_std(cells["server compute (s)"], [sum(r["server-seconds"] for r in rows) for rows in runs.values()])
        reached = [next((r["round"] for r in rows if r["accuracy"] >= 0.1), None) for rows in runs.values()]
        reached = [r for r in reached if r is not None]
        if len(reached) == len(seeds):
            _assert_mean_std(cells["rounds to 10%"], reached)
        else:
            assert cells["rounds to 10%"].endswith(f"({len(reached)}/2 seeds)" if reached else "not reached")
        worst_seed, worst_accuracy = re.fullmatch(r"(\d+) \((\S+)\)", cells["worst seed (final acc)"]).groups()
        assert final[int(worst_seed)] == min(final.values()) and float(worst_accuracy) == pytest.approx(
            min(final.values()), abs=5e-5
        )
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 1000 and (out / plot).read_bytes()[:4] == b"\x89PNG"
    # --report-only rebuilds the same report from the runs on disk, running nothing
    (out / "report.md").unlink()
    assert (
        main(
            [
                "compare",
                "--out",
                str(out),
                "--strategies",
                "hosfl,heron-sfl",
                "--seeds",
                "1,4",
                "--budget-samples",
                str(budget),
                "--run-config",
                shared,
                "--target-accuracy",
                "0.1",
                "--num-supernodes",
                "4",
                "--no-memory",
                "--report-only",
            ]
        )
        == 0
    )
    assert (out / "report.md").read_text() == report


def _run(strategy: str, seed: int, accuracies: list[float], total: int, seconds: float) -> RunSummary:
    rows = [
        {
            "round": r,
            "accuracy": a,
            "bytes.total": total,
            "client-seconds": seconds,
            "server-seconds": seconds / 2,
            "samples": 16,
            "server-steps": 1,
            "bytes.model_up": total,
        }
        for r, a in enumerate(accuracies, start=1)
    ]
    return RunSummary(strategy, seed, rows, target=0.5)


def test_statistics_over_seeds_on_hand_made_rows(tmp_path):
    runs = [
        _run("a", 3, [0.2, 0.6, 0.5], 1000, 1.0),
        _run("a", 5, [0.1, 0.3, 0.4], 3000, 2.0),
        _run("a", 7, [0.5, 0.7, 0.9], 2000, 6.0),
    ]
    assert worst_run(runs).seed == 5
    assert spread([1.0]).std is None and spread([1.0, 2.0, 6.0]).std == pytest.approx(np.std([1, 2, 6], ddof=1))
    x, mean, std = accuracy_band(runs, "client-seconds")
    assert np.allclose(x, [3.0, 6.0, 9.0]) and np.allclose(mean, [0.8 / 3, 1.6 / 3, 0.6])
    assert np.allclose(std, np.std([[0.2, 0.6, 0.5], [0.1, 0.3, 0.4], [0.5, 0.7, 0.9]], axis=0, ddof=1))
    assert accuracy_band(runs[:1], None)[2] is None and list(accuracy_band(runs[:1], None)[0]) == [1.0, 2.0, 3.0]
    single = [_run("b", 3, [0.25, 0.75], 500, 0.5)]
    report = write_report(
        tmp_path, [StrategyResults("a", runs), StrategyResults("b", single[:1])], {"x": 1}, [3, 5, 7]
    ).read_text()
    table = _table(report)
    _assert_mean_std(table["a"]["final acc"], [0.5, 0.4, 0.9])
    _assert_mean_std(table["a"]["total bytes"], [3000, 9000, 6000])
    _assert_mean_std(table["a"]["client compute (s)"], [3.0, 6.0, 18.0])
    assert table["a"]["rounds to 50%"] == "1.50 ± 0.71 (2/3 seeds)" and table["a"]["worst seed (final acc)"] == "5 (0.4000)"
    assert table["a"]["server steps / round"] == "1" and table["a"]["samples"] == "48"
    assert table["b (1/3 seeds)"]["final acc"] == "0.7500" and table["b (1/3 seeds)"]["rounds to 50%"] == "2"
    assert "Seeds: 3 (3, 5, 7)" in report
    for plot in PLOTS:
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def test_round_costs_per_protocol():
    config = resolve_run_config(
        {
            "clients-per-round": 3,
            "batch-size": 8,
            "splitfed.local-steps": 2,
            "heron.local-steps": 6,
            "heron.upload-every": 2,
            "fedavg.local-steps": 5,
            "cse-fsl.local-steps": 3,
            "cse-fsl.upload-every": 2,
            "fsl-sage.local-steps": 4,
            "fsl-sage.upload-every": 1,
            "mu-splitfed.local-steps": 2,
            "mu-splitfed.server-steps": 3,
        }
    )
    names = ("hosfl", "frozen-client", "zo-sfl", "splitfed-v1", "splitfed-v2", "heron-sfl", "fedavg")
    samples = {s: samples_per_round(s, config) for s in (*names, "cse-fsl", "fsl-sage", "mu-splitfed")}
    assert samples == {
        "hosfl": 24,
        "frozen-client": 24,
        "zo-sfl": 24,
        "splitfed-v1": 48,
        "splitfed-v2": 48,
        "heron-sfl": 144,
        "fedavg": 120,
        "cse-fsl": 72,
        "fsl-sage": 96,
        "mu-splitfed": 48,
    }
    steps = {s: server_steps_per_round(s, config) for s in samples}
    assert steps == {
        "hosfl": 1,
        "frozen-client": 1,
        "zo-sfl": 1,
        "splitfed-v1": 6,
        "splitfed-v2": 6,
        "heron-sfl": 3 * len(upload_steps(6, 2)),
        "fedavg": 0,
        "cse-fsl": 3 * 1,  # step 1 of 0..2
        "fsl-sage": 3 * 4,
        "mu-splitfed": 3 * 2 * 3,  # τ replica steps per client step
    }
    assert rounds_for_budget("hosfl", config, 48) == 2 and rounds_for_budget("hosfl", config, 49) == 3
    assert rounds_for_budget("heron-sfl", config, 1) == 1 and math.ceil(1000 / 120) == rounds_for_budget("fedavg", config, 1000)


def test_runs_at_the_same_time_share_the_cpus_and_flower_simulation_takes_the_share(monkeypatch):
    """``--jobs N`` gives each of the N runs ``flower-simulation --num-cpus`` of an equal share (the fixture's
    ``--jobs 2`` runs on the 2-core CI machine take one CPU each, so one ClientApp actor each)."""
    import flwr.simulation

    from hosfl_flower import cli, compare

    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # what cli.main sets, undone after the test
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert [compare.cpus_per_run(jobs) for jobs in (1, 2, 3, 16, 40)] == [None, 8, 5, 1, 1]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert compare.cpus_per_run(2) == 1
    seen = {}
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["--app", "hosfl_flower.app", "--num-supernodes", "2", "--num-cpus", "1"]) == 0
    assert seen["backend_config"]["init_args"] == {"num_cpus": 1}
    assert cli.main(["--app", "hosfl_flower.app", "--num-supernodes", "2"]) == 0
    assert "init_args" not in seen["backend_config"]  # every CPU, as before
    with pytest.raises(SystemExit):
        cli.main(["--app", "hosfl_flower.app", "--num-cpus", "0"])


@pytest.mark.parametrize(
    "args",
    [
        ["--seeds", "0,x"],
        ["--seeds", "1,1"],
        ["--budget-samples", "0"],
        ["--budget-samples", "many"],
        ["--strategies", "hosfl,nope"],
        ["--jobs", "0"],
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, capsys, tmp_path):
    assert main(["compare", "--out", str(tmp_path / "never"), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and args[0] in captured.err
    assert not (tmp_path / "never").exists()
