"""``hosfl compare``: three strategies, a few rounds, a report with numbers and plots."""

import re
import subprocess

from .conftest import BIN, ROOT, subprocess_env


def test_compare_writes_a_report_with_numbers(tmp_path):
    out = tmp_path / "report"
    process = subprocess.run(
        [str(BIN / "hosfl"), "compare", "--strategies", "hosfl,splitfed-v2,fedavg", "--num-supernodes", "4",
         "--run-config", "num-server-rounds=3 eval-every=1", "--out", str(out), "--target-accuracy", "0.05"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert re.search(r"\[1/3\] hosfl +round +3/3 +test acc", process.stdout)
    report = (out / "report.md").read_text()
    for strategy in ("hosfl", "splitfed-v2", "fedavg"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {strategy} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and cells[3] == "1"  # final accuracy; target 5 % reached at round 1
        assert cells[4].endswith("B") and cells[8].endswith("B")  # total bytes, client peak memory
    for plot in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "bytes_per_category.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
