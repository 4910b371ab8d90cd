"""Helpers shared by the benchmark scripts: paths, argument parsing, tables, local transformer checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no download/loading bars in the tables
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent

LLM_CONFIG = {"model": "tiny-llama", "dataset": "sentiment", "lora.rank": 8}
"""The named tiny transformer with LoRA rank 8 on the offline sentiment task."""


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """``--quick`` (a fast smoke run) plus any script-specific options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (fewer sizes and repetitions)")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def set_threads(count: int = 1) -> None:
    """One intra-op thread, as the package's ``torch-threads`` default."""
    import torch

    torch.set_num_threads(count)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain fixed-width table."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def ratio_line(name: str, value: float, limit: float | None = None, above: bool = False) -> str:
    """``ratio <name> = <value>`` and, with a limit, whether it meets the target."""
    line = f"ratio {name} = {value:.3f}" if abs(value) >= 0.01 else f"ratio {name} = {value:.2e}"
    if limit is not None:
        ok = value >= limit if above else value <= limit
        line += f"   (target {'>=' if above else '<='} {limit:g}: {'met' if ok else 'NOT met'})"
    return line


def mib(count: float) -> float:
    return count / 2**20


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls (``time.perf_counter``)."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for ``flower-simulation`` subprocesses: the package's ``script_env`` with the
    repository on ``PYTHONPATH``."""
    from hosfl_flower.cli import script_env

    return script_env(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p), **extra)


def llama_client_params(hidden: int, intermediate: int, cut_layer: int = 2, vocab: int = 128) -> int:
    """Trainable client parameters of a full fine-tuned local Llama (:func:`local_llama`) cut after ``cut_layer``."""
    kv = hidden // 2  # 4 heads, 2 key-value heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden + cut_layer * per_layer


def save_local_llama(directory: Path, hidden: int, intermediate: int) -> Path:
    """Save a randomly initialised 3-block Llama classifier (vocabulary 128, 4 heads, 2 key-value heads).

    The package loads it with ``model='<directory>'`` (``from_pretrained``, nothing downloaded); the
    offline sentiment task's tokenizer fits its vocabulary.
    """
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=2,
        tie_word_embeddings=False,
        num_labels=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config)
    model.save_pretrained(directory)
    return directory


@contextmanager
def local_llamas(*sizes: tuple[int, int]) -> Iterator[list[Path]]:
    """Temporary local Llama checkpoints of the given ``(hidden, intermediate)`` sizes, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="hosfl-bench-") as tmp:
        yield [save_local_llama(Path(tmp) / f"llama-{h}-{i}", h, i) for h, i in sizes]


def machine() -> str:
    """CPU model and core count (for the record)."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def run_config_text(config: Mapping[str, Any]) -> str:
    """``key=value`` overrides in the TOML syntax ``--run-config`` takes."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    return " ".join(f"{k}={value(v)}" for k, v in config.items())


def run_flower_simulation(
    num_supernodes: int, run_config: str, timeout: float = 900.0, extra_args: Sequence[str] = ()
) -> dict[str, Any]:
    """``flower-simulation --app hosfl_flower.app`` in its own process group; watch its memory until it exits.

    Returns the exit code, the output, the wall seconds and the simulation process's peak resident set
    (``VmHWM`` from ``/proc``, polled; the ServerApp runs in this process, ClientApps in Ray actors).
    The whole process group is killed if the run outlives ``timeout``.
    """
    import signal
    import subprocess

    command = [
        str(BIN / "flower-simulation"),
        "--app",
        "hosfl_flower.app",
        "--num-supernodes",
        str(num_supernodes),
        "--run-config",
        run_config,
        *extra_args,
    ]
    log = tempfile.TemporaryFile(mode="w+")
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    peak = rss = 0
    try:
        while process.poll() is None:
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"flower-simulation ran past {timeout:.0f} s")
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                peak = max(peak, int(fields["VmHWM"].split()[0]) * 1024)
                rss = int(fields["VmRSS"].split()[0]) * 1024
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.1)
    finally:
        try:  # the run, and anything of its process group left behind (Ray helpers)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    log.seek(0)
    output = log.read()
    log.close()
    return {
        "returncode": process.returncode,
        "output": output,
        "seconds": time.perf_counter() - started,
        "peak_rss": peak,
        "last_rss": rss,
    }
