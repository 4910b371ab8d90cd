"""Client peak memory of one protocol step, each case measured in a fresh subprocess.

A *case* is one method on one run config. It runs in its own Python process (``python -m
hosfl_flower.memory --worker ...``), so cases never share allocator state. The worker builds the
client as a node would (:func:`hosfl_flower.task.client_task`), runs the step once to warm up, then
measures it ``repeats`` times and reports every sample; the parent takes the median.

What a step is, per method (messages a node receives — ``λ``, weights — are allocated inside the step):

- ``inference``: draw the minibatch and run ``model.smash(inputs)`` under ``torch.no_grad()``.
- ``hosfl``: ``HOSFLClient.smash`` (with one ledger entry to replay, as a node sampled in consecutive
  rounds gets) then ``HOSFLClient.probe`` with a random ``λ`` shaped like ``z`` and ``P`` seeds, with the
  run config's ``zo.estimator`` and ``zo.directions`` (as ``hosfl-lean`` does).
- ``heron-sfl``: one ``HOSFLClient.heron_train`` round of two zeroth-order steps.
- ``splitfed``: ``splitfed_smash`` (receiving ``θ_c``) then ``splitfed_backward`` with a random ``λ``.
- ``zo-sfl``: ``zo_smash`` (``z`` and ``P`` perturbed activations).
- ``fedavg``: one ``fit`` of the whole model (receiving the whole model, one first-order step).
- ``hosfl-lean``: see :data:`LEAN_METHOD`.

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
from pathlib import Path
from typing import Any

METHODS = ("inference", "hosfl", "heron-sfl", "splitfed", "zo-sfl", "fedavg")
"""Methods whose client step can be measured (each is a strategy's client work)."""

LEAN_METHOD = "hosfl-lean"
"""HO-SFL's client arithmetic with no node state at all: ``θ_c`` replayed in the model, the smashed
batch kept as tensors, ``⟨λ, z⟩`` folded into one float64 scalar when ``λ`` arrives (so ``z`` is
freed), each probe's ``z̃`` freed before the next forward. It is the floor of any client that must
receive ``λ``; :class:`~hosfl_flower.client.HOSFLClient` does the same arithmetic and in addition keeps
its weights and the smashed batch in Flower records of the node state."""

ALL_METHODS = (*METHODS, LEAN_METHOD)

DEVICES = ("auto", "cpu", "cuda")
HERON_STEPS = 2
"""Zeroth-order local steps of the measured HERON-SFL round (the peak does not grow with more)."""

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
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(ALL_METHODS)}")
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
            result = json.loads(line[len(_RESULT_MARKER):])
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


def build_case(
    method: str, run_config: Mapping[str, Any], num_partitions: int = 1, device: str = "cpu"
) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The step of ``method`` as a closure (in this process), and the case's shapes.

    Everything a node holds between messages (model, data, the shared initial ``θ_c``) is built here;
    everything it receives or computes during the step is allocated by the closure.
    """
    import torch

    from .client import ClientSettings, HOSFLClient
    from .config import resolve_run_config
    from .data import sample_batch
    from .models.aux_head import build_aux_head
    from .schedule import RoundSchedule
    from .task import client_task
    from .zo import SGD, LedgerEntry, dot64, needs_anchor, probe_scalars, replay

    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(ALL_METHODS)}")
    cfg = resolve_run_config(run_config)
    torch.set_num_threads(cfg["torch-threads"])
    task = client_task(cfg, num_partitions)
    model, initial = task.model, task.initial_client_state
    model.load_client_state(initial)
    if device != "cpu":
        _on_device(model, torch.device(device))
    train = task.data.partition(0)
    settings = ClientSettings.from_config(cfg, 0)
    seed, batch_size, mu = cfg["seed"], cfg["batch-size"], cfg["zo.mu"]
    estimator, directions = cfg["zo.estimator"], cfg["zo.directions"]
    server_round = 2
    schedule = RoundSchedule(seed)
    seeds = schedule.seeds(cfg["zo.num-perturbations"])
    previous = LedgerEntry(
        server_round - 1, schedule.seeds(len(seeds)), tuple(1e-3 for _ in seeds), cfg["client.lr"], mu, directions
    )
    with torch.no_grad():
        z_example = model.smash(sample_batch(train, batch_size, seed, 0, server_round).inputs)["z"]
    lam_received = torch.randn(z_example.shape, generator=torch.Generator().manual_seed(seed)) / z_example.numel()
    info = {
        "batch_size": int(z_example.shape[0]),
        "z_numel": int(z_example.numel()),
        "client_params": int(sum(p.numel() for p in model.client_parameters())),
        "model_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
    }

    def new_client() -> HOSFLClient:
        return HOSFLClient(model, train, settings, initial)

    def received_weights() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in initial.items()}

    if method == "inference":

        def step() -> Any:
            with torch.no_grad():
                batch = sample_batch(train, batch_size, seed, 0, server_round)
                return model.smash(batch.inputs)

    elif method == "hosfl":

        def step() -> Any:
            client = new_client()
            reply = client.smash(server_round, [previous], 0)
            del reply  # sent to the server before λ comes back
            scalars, _ = client.probe(server_round, lam_received.clone(), seeds, mu, estimator, directions)
            return scalars

    elif method == "heron-sfl":
        head = build_aux_head(cfg["heron.head"], z_example, model.num_classes, seed)
        head_state = {k: v.clone() for k, v in head.state_dict().items()}
        upload_every = min(cfg["heron.upload-every"], HERON_STEPS)

        def step() -> Any:
            client = new_client()
            head.load_state_dict({k: v.clone() for k, v in head_state.items()})
            kept, _ = client.heron_train(server_round, received_weights(), head, HERON_STEPS, upload_every, mu, cfg["heron.lr"])
            return kept

    elif method == "splitfed":
        splitfed_lr = cfg["splitfed.lr"]

        def step() -> Any:
            client = new_client()
            reply = client.splitfed_smash(server_round, 0, received_weights())
            del reply
            weights, _ = client.splitfed_backward(server_round, 0, lam_received.clone(), splitfed_lr)
            return weights

    elif method == "zo-sfl":

        def step() -> Any:
            return new_client().zo_smash(server_round, seeds, mu, [], 0)

    elif method == LEAN_METHOD:
        params = model.client_parameters()

        def step() -> Any:
            with torch.no_grad():
                model.load_client_state(initial)
                replay(params, SGD(), [previous])
                inputs = sample_batch(train, batch_size, seed, 0, server_round).inputs
                z = model.smash(inputs)["z"]  # sent; kept until λ arrives
                lam = lam_received.clone()
                anchor = dot64(lam, z) if needs_anchor(estimator) else None
                del z
                return probe_scalars(
                    estimator, lambda: model.smash(inputs)["z"], model.client, lam, seeds, mu,
                    anchor=anchor, distribution=directions,
                )

    else:  # fedavg
        whole = [array.copy() for array in new_client().get_parameters({})]
        fit_config = {"local-steps": 1, "lr": cfg["fedavg.lr"], "server-round": server_round}

        def step() -> Any:
            return new_client().fit([array.copy() for array in whole], fit_config)

    return step, info


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
    parser.add_argument("--method", action="append", choices=ALL_METHODS, help="repeatable (default: the six methods)")
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
            args.method or METHODS, overrides, args.repeats, num_partitions=args.num_partitions, device=args.device
        )
    except ConfigError as error:
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
