"""Client peak memory of one protocol step, each case measured in a fresh subprocess.

A *case* is one method on one run config. It runs in its own Python process (``python -m
hosfl_flower.memory --worker ...``), so cases never share allocator state. The worker builds the
client as a node would (:func:`hosfl_flower.task.client_task`), runs the step once to warm up, then
measures it ``repeats`` times and reports every sample; the parent takes the median.

What a step is: ``inference`` draws the minibatch and runs ``model.smash(inputs)`` under
``torch.no_grad()``; a protocol's step is its ``memory_step`` (registered with the protocol), which
calls the protocol's own client handlers on a fresh :class:`MemoryCase` — HO-SFL: ``train.smash``
(with one ledger entry to replay, as a node sampled in consecutive rounds gets) then ``train.probe``
with a random ``λ`` shaped like ``z`` and ``P`` seeds. Messages a node receives (``λ``, weights) are
allocated inside the step.

On CPU the peak is the resident set: the kernel's high-water mark is reset by writing ``5`` to
``/proc/self/clear_refs`` right before the step, and the step's peak is ``VmHWM`` after it minus
``VmRSS`` before it. The worker runs with glibc's ``mmap`` threshold pinned (and ``malloc_trim``
before every sample) so freed tensors leave the resident set instead of being recycled unseen. With
CUDA the model runs on the GPU and the peak is ``torch.cuda.max_memory_allocated`` over the
allocation before the step.

This module imports no Flower code itself; the worker imports the client lazily.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_METHODS = ("inference", "hosfl", "heron-sfl", "splitfed-v2", "zo-sfl", "fedavg", "cse-fsl", "fsl-sage", "mu-splitfed")
"""The methods measured when none is named (``inference`` and a protocol per family)."""

DEVICES = ("auto", "cpu", "cuda")

_RESULT_MARKER = "HOSFL-MEMORY-RESULT "
_PACKAGE_PARENT = Path(__file__).resolve().parents[1]
_MALLOC_ENV = {
    # A fixed mmap threshold disables glibc's dynamic threshold, so large tensors are always mmapped
    # and returned to the kernel when freed; the resident set then follows live memory.
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "131072",
    "MALLOC_ARENA_MAX": "2",
}


# --------------------------------------------------------------------------- public API
def measure_client_peak(
    method: str,
    run_config: Mapping[str, Any],
    repeats: int = 3,
    *,
    num_partitions: int = 1,
    device: str = "auto",
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Peak client memory of one ``method`` step on ``run_config``, measured in a fresh subprocess.

    ``num_partitions`` splits the training data as a run would (node 0 is measured; the default 1
    gives it all the data, so large ``batch-size`` values are not capped by a small partition).
    Returns ``method``, ``bytes`` (the peak: median over ``repeats``), ``samples``, ``baseline_bytes``
    (memory held before the step), ``backend`` (``rss`` or ``cuda``), ``step_seconds`` (median),
    ``graph_forwards`` (client-segment module calls of one step that recorded an autograd graph: 0 for
    the forward-only methods) and the case's shapes (``batch_size``, ``z_numel``, ``client_params``).
    """
    if method not in all_methods():
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(all_methods())}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; allowed: {', '.join(DEVICES)}")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    from .config import resolve_run_config

    config = resolve_run_config(run_config)
    payload = {
        "method": method,
        "run_config": dict(run_config),
        "repeats": int(repeats),
        "num_partitions": int(num_partitions),
        "device": device,
    }
    process = subprocess.run(
        [sys.executable, "-m", "hosfl_flower.memory", "--worker", json.dumps(payload)],
        cwd=_PACKAGE_PARENT,
        env=worker_env(config["torch-threads"]),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result = None
    for line in process.stdout.splitlines():
        if line.startswith(_RESULT_MARKER):
            result = json.loads(line[len(_RESULT_MARKER) :])
    if process.returncode != 0 or result is None:
        tail = (process.stderr or process.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"memory worker for {method!r} failed (exit {process.returncode}):\n" + "\n".join(tail))
    result["bytes"] = int(statistics.median(result["samples"]))
    return result


def measure_client_peaks(
    methods: Sequence[str], run_config: Mapping[str, Any], repeats: int = 3, **kwargs: Any
) -> dict[str, dict[str, Any]]:
    """:func:`measure_client_peak` for each of ``methods`` (one subprocess each), by method."""
    return {method: measure_client_peak(method, run_config, repeats, **kwargs) for method in methods}


def worker_env(threads: int = 1) -> dict[str, str]:
    """Environment of a measuring subprocess: pinned malloc thresholds, thread counts, the package on the path."""
    env = dict(os.environ)
    env.update(_MALLOC_ENV)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
    return env


# --------------------------------------------------------------------------- memory probes
def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Probe:
    """Measures the peak of one call: resident-set high-water mark on CPU, allocator peak on CUDA."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        if not cuda and not Path("/proc/self/clear_refs").exists():
            raise RuntimeError("CPU peak memory needs Linux (/proc/self/clear_refs and VmHWM)")

    @property
    def backend(self) -> str:
        return "cuda" if self.cuda else "rss"

    def held(self) -> int:
        """Memory held right now (the baseline of the next measurement)."""
        if self.cuda:
            import torch

            return int(torch.cuda.memory_allocated())
        return _proc_status_bytes("VmRSS")

    def measure(self, step: Callable[[], Any]) -> tuple[int, float]:
        """``(peak bytes above the memory held before the step, step seconds)``."""
        import torch

        gc.collect()
        _malloc_trim()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_high_water_mark()
        before = self.held()
        start = time.perf_counter()
        out = step()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = int(torch.cuda.max_memory_allocated()) if self.cuda else _proc_status_bytes("VmHWM")
        del out
        return max(peak - before, 0), seconds


# --------------------------------------------------------------------------- the cases
def _on_device(model: Any, device: Any) -> None:
    """Run ``model`` on ``device`` behind its CPU interface: inputs move in, outputs move back out.

    The client keeps its records, ``λ`` and batches on the CPU (as a node's messages are); only the
    segments' computation, which is what the GPU peak measures, runs on the device.
    """
    import torch

    model.to(device)
    smash, head = model.smash, model.head

    def to(values: Mapping[str, torch.Tensor], target: Any) -> dict[str, torch.Tensor]:
        return {k: v.to(target) for k, v in values.items()}

    model.smash = lambda inputs: to(smash(to(inputs, device)), "cpu")
    model.head = lambda smashed: head(to(smashed, device)).to("cpu")


@dataclass
class MemoryCase:
    """What a node holds between messages, and what it receives in the measured step.

    A protocol's ``memory_step(case)`` (its registration) returns the step as a closure; everything
    the node receives or computes during the step is allocated inside it (``received_weights``,
    ``activation_grad()`` are fresh copies).
    """

    cfg: Mapping[str, Any]
    task: Any
    train: Any
    server_round: int
    seeds: tuple[int, ...]
    previous: Any
    z_example: Any
    lam: Any

    def new_client(self) -> Any:
        """The node's client, as the ClientApp builds it for a message (its state starts empty)."""
        from .node.client import ClientSettings, HOSFLClient
        from .node.store import WeightStore

        return HOSFLClient(
            self.task.model,
            self.train,
            ClientSettings.from_config(self.cfg, 0),
            self.task.initial_client_state,
            store=WeightStore(None, memory_versions=1),
        )

    def received_weights(self) -> dict[str, Any]:
        """A fresh copy of ``θ_c`` as a message would bring it."""
        return {k: v.clone() for k, v in self.task.initial_client_state.items()}

    def activation_grad(self) -> Any:
        """A fresh ``λ`` shaped like ``z``."""
        return self.lam.clone()


def build_case(
    method: str, run_config: Mapping[str, Any], num_partitions: int = 1, device: str = "cpu"
) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The step of ``method`` as a closure (in this process), and the case's shapes.

    Everything a node holds between messages (model, data, the shared initial ``θ_c``) is built here;
    everything it receives or computes during the step is allocated by the closure.
    """
    import torch

    from .config import resolve_run_config
    from .data import sample_batch
    from .protocols.registry import protocols
    from .schedule import RoundSchedule
    from .task import client_task
    from .zo import LedgerEntry

    methods = all_methods()
    if method not in methods:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(methods)}")
    cfg = resolve_run_config(run_config, {"strategy": method} if method != "inference" else {})
    torch.set_num_threads(cfg["torch-threads"])
    task = client_task(cfg, num_partitions)
    model = task.model
    model.load_client_state(task.initial_client_state)
    if device != "cpu":
        _on_device(model, torch.device(device))
    train = task.data.partition(0)
    server_round, schedule = 2, RoundSchedule(cfg["seed"])
    seeds = schedule.seeds(cfg["zo.num-perturbations"])
    previous = LedgerEntry(
        server_round - 1,
        schedule.seeds(len(seeds)),
        tuple(1e-3 for _ in seeds),
        cfg["client.lr"],
        cfg["zo.mu"],
        cfg["zo.directions"],
    )
    batch = sample_batch(train, cfg["batch-size"], cfg["seed"], 0, server_round)
    with torch.no_grad():
        z_example = model.smash(batch.inputs)["z"]
    lam = torch.randn(z_example.shape, generator=torch.Generator().manual_seed(cfg["seed"])) / z_example.numel()
    info = {
        "batch_size": int(z_example.shape[0]),
        "z_numel": int(z_example.numel()),
        "client_params": int(sum(p.numel() for p in model.client_parameters())),
        "model_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
    }
    if method == "inference":

        def step() -> Any:
            with torch.no_grad():
                return model.smash(sample_batch(train, cfg["batch-size"], cfg["seed"], 0, server_round).inputs)

        return step, info
    case = MemoryCase(cfg, task, train, server_round, tuple(seeds), previous, z_example, lam)
    memory_step = protocols()[method].memory_step
    assert memory_step is not None  # all_methods() lists only protocols with one
    return memory_step(case), info


def all_methods() -> tuple[str, ...]:
    """``inference`` and every registered protocol with a memory step."""
    from .protocols.registry import protocols

    return ("inference", *(name for name, spec in protocols().items() if spec.memory_step is not None))


def count_graph_forwards(model: Any, step: Callable[[], Any]) -> int:
    """Run ``step`` once and count the client-segment module calls whose output carries an autograd graph.

    Zero means the step ran the client segment without recording anything for a backward pass.
    """
    import torch

    count = 0

    def hook(module: Any, args: Any, output: Any) -> None:
        nonlocal count
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        if any(isinstance(o, torch.Tensor) and o.grad_fn is not None for o in outputs):
            count += 1

    handles = [
        module.register_forward_hook(hook)
        for module in model.client.modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return count


def _worker(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Run one case in this process: warm up, then ``repeats`` measured steps."""
    import torch

    from .config import resolve_run_config
    from .task import client_task

    device = payload["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available")
    step, info = build_case(payload["method"], payload["run_config"], payload["num_partitions"], device)
    probe = _Probe(cuda=device == "cuda")
    step()  # warm-up: one-time allocations (kernels, caches, lazily loaded code) stay out of the samples
    samples, seconds = [], []
    for _ in range(payload["repeats"]):
        peak, elapsed = probe.measure(step)
        samples.append(peak)
        seconds.append(elapsed)
    gc.collect()
    baseline = probe.held()
    model = client_task(resolve_run_config(payload["run_config"]), payload["num_partitions"]).model
    return {
        "method": payload["method"],
        "samples": samples,
        "baseline_bytes": baseline,
        "graph_forwards": count_graph_forwards(model, step),
        "backend": probe.backend,
        "device": device,
        "step_seconds": statistics.median(seconds),
        **info,
    }


# --------------------------------------------------------------------------- command line
def _mib(count: float) -> str:
    return f"{count / 2**20:.2f}"


def main(argv: list[str] | None = None) -> int:
    """``python -m hosfl_flower.memory [--method M ...] [--run-config "k=v ..."] [--repeats N] [--json]``."""
    parser = argparse.ArgumentParser(prog="python -m hosfl_flower.memory", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--method", action="append", help="a registered protocol or inference; repeatable (default: the six methods)"
    )
    parser.add_argument("--run-config", default="", help='run-config overrides, e.g. "batch-size=1024"')
    parser.add_argument("--repeats", type=int, default=3, help="measured steps per case (median reported)")
    parser.add_argument("--num-partitions", type=int, default=1, help="partitions of the training data (node 0 is measured)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(_RESULT_MARKER + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    from .config import ConfigError, parse_run_config_overrides

    try:
        overrides = parse_run_config_overrides(args.run_config) if args.run_config.strip() else {}
        results = measure_client_peaks(
            args.method or DEFAULT_METHODS, overrides, args.repeats, num_partitions=args.num_partitions, device=args.device
        )
    except (ConfigError, ValueError) as error:
        print(f"hosfl_flower.memory: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    reference = results.get("inference", {}).get("bytes")
    print(f"{'method':<10} {'peak MiB':>9} {'vs inference':>12} {'graph calls':>11}  samples (MiB)")
    for method, result in results.items():
        ratio = f"{result['bytes'] / reference:.2f}" if reference else "-"
        samples = ", ".join(_mib(s) for s in result["samples"])
        print(f"{method:<10} {_mib(result['bytes']):>9} {ratio:>12} {result['graph_forwards']:>11}  {samples}")
    first = next(iter(results.values()))
    print(f"backend {first['backend']}, batch {first['batch_size']}, z {first['z_numel']} floats, d_c {first['client_params']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
