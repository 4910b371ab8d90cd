"""GPU benchmark: client peak memory per method, server step throughput per precision, client probe time vs (P+1) forwards.

Every case runs in this process on ``--device`` (default ``cuda``; without CUDA the script says so and
exits). A node computes as a run with ``client.device`` set makes it: its canonical ``θ_c`` stays float32
on the CPU and every forward runs on the node's device copy (docs/protocols.md, "Devices"); on the CPU
(``--device cpu``) the nodes still go through that copy (``HOSFLClient.always_copy``), so the script
checks the same path without a GPU.

- Client peak memory of one step per method (``inference``, ``hosfl``, ``splitfed-v2``, ``zo-sfl``: each
  protocol's registered ``memory_step``, its own handlers): ``torch.cuda.max_memory_allocated`` during the
  step above what was allocated before it (the device copy of the client segment is allocated then).
  CUDA only; on the CPU the column is empty.
- Server step throughput: examples per second of :class:`~hosfl_flower.split_server.SplitServer` steps on
  the device, at ``split-server.precision`` fp32, bf16 (and fp16 on CUDA).
- Client probe time: the ``hosfl`` step (``train.smash`` with one ledger entry, then ``train.probe``) vs
  ``P + 1`` forward passes of the device copy, interleaved, medians; with the bytes the step copies to the
  device and the time of one host-to-device copy of the trainable ``θ_c`` (what each probe forward costs).

Two tasks: the fine-tuning quickstart (examples/quickstart/finetune.toml) and a 100 M+ parameter
Llama-layout decoder built from a configuration (hidden 768, 12 layers, vocabulary 32 000, LoRA r = 8,
client = embeddings + 6 blocks, 128 tokens). ``--quick`` shrinks both (the tiny-llama in place of the
pretrained one, a 4-block decoder of hidden 64) and the repetitions. Writes ``--out`` (JSON) and prints a table.

    python benchmarks/gpu.py [--device cuda|cpu] [--quick] [--out gpu-benchmark.json]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import ROOT, machine, mib, parse_args, set_threads, table

METHODS = ("inference", "hosfl", "splitfed-v2", "zo-sfl")
DECODER = "tiny-bench-llama"
"""The name the benchmark's decoder configuration is registered under (in this process only)."""

DECODER_SIZES = {  # by --quick
    False: dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, vocab_size=32000),
    True: dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=1000),
}


def finetune_config(quick: bool) -> dict[str, Any]:
    """The quickstart's fine-tuning run config (``--quick``: the tiny-llama, no pretraining, batch 8)."""
    flat: dict[str, Any] = {}

    def walk(table_: dict[str, Any], prefix: str = "") -> None:
        for key, value in table_.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(tomllib.loads((ROOT / "examples/quickstart/finetune.toml").read_text()))
    if quick:
        flat.update({"model": "tiny-llama", "cut-layer": 2, "batch-size": 8})
    return flat


def decoder_config(quick: bool) -> dict[str, Any]:
    """The decoder's run config (its configuration registered as :data:`DECODER`)."""
    from transformers import LlamaConfig

    from hosfl_flower.models.hf.configs import TINY_CONFIGS

    size = DECODER_SIZES[quick]
    TINY_CONFIGS[DECODER] = lambda: LlamaConfig(
        **size,
        num_key_value_heads=size["num_attention_heads"],
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return {
        "model": DECODER,
        "dataset": "sentiment",
        "lora.rank": 8,
        "lora.targets": "q_proj,v_proj",
        "cut-layer": size["num_hidden_layers"] // 2,
        "max-length": 32 if quick else 128,
        "batch-size": 4 if quick else 16,
        "zo.num-perturbations": 5,
        "client.lr": 1e-3,
        "splitfed.lr": 1e-3,
    }


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(step: Callable[[], Any], device: Any) -> tuple[int | None, int | None]:
    """``(peak bytes above the allocation before the step, bytes allocated before it)``; ``None`` off CUDA."""
    import torch

    if device.type != "cuda":
        step()
        return None, None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak), int(before)


def client_cases(name: str, config: dict[str, Any], device: Any, repeats: int) -> dict[str, Any]:
    """Peak memory per method, and the probe step against ``P + 1`` forwards, of one task."""
    import torch

    from hosfl_flower.config import resolve_run_config
    from hosfl_flower.data import sample_batch
    from hosfl_flower.memory import build_case
    from hosfl_flower.node.client import device_copy
    from hosfl_flower.task import client_task

    cfg = resolve_run_config(config)
    task = client_task(cfg, 1)
    work = device_copy(task.model, device)
    inputs = work.to_device(sample_batch(task.data.partition(0), cfg["batch-size"], cfg["seed"], 0, 2).inputs)

    @torch.no_grad()
    def forward() -> Any:
        return work.pull().smash(inputs)["z"]

    memory: dict[str, Any] = {}
    steps: dict[str, Callable[[], Any]] = {"inference": forward}
    info: dict[str, Any] = {}
    for method in METHODS[1:]:
        steps[method], info = build_case(method, cfg)
    for method, step in steps.items():
        step()  # warm-up: the device copy, kernels and caches are allocated outside the samples
        samples = [peak_bytes(step, device) for _ in range(repeats)]
        peaks = [p for p, _ in samples if p is not None]
        memory[method] = {
            "peak_bytes": int(statistics.median(peaks)) if peaks else None,
            "held_bytes": samples[-1][1],
        }

    # the probe step vs (P+1) forwards, interleaved; bytes copied to the device per step
    hosfl, forwards, seconds = steps["hosfl"], [], []
    before = work.bytes_to_device
    hosfl()
    step_bytes = work.bytes_to_device - before
    for _ in range(max(repeats * 4, 5)):
        for fn, out in ((forward, forwards), (hosfl, seconds)):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - start)
    trainable = [(s, t) for s, t in work._pairs if s.requires_grad]

    @torch.no_grad()
    def copy_theta() -> None:
        for source, target in trainable:
            target.copy_(source)

    copies = []
    for _ in range(max(repeats * 4, 5)):
        synchronize(device)
        start = time.perf_counter()
        copy_theta()
        synchronize(device)
        copies.append(time.perf_counter() - start)
    p = cfg["zo.num-perturbations"]
    forward_s, step_s = statistics.median(forwards), statistics.median(seconds)
    return {
        "task": name,
        "run_config": config,
        "batch_size": info["batch_size"],
        "client_params": info["client_params"],
        "client_total_params": sum(t.numel() for _, t in work._pairs),
        "model_params": sum(x.numel() for x in task.model.parameters()),
        "P": p,
        "memory": memory,
        "forward_s": forward_s,
        "step_s": step_s,
        "step_over_forwards": step_s / ((p + 1) * forward_s),
        "step_bytes_to_device": step_bytes,
        "theta_bytes": sum(s.numel() * s.element_size() for s, _ in trainable),
        "theta_copy_s": statistics.median(copies),
    }


def server_throughput(config: dict[str, Any], device: Any, repeats: int) -> dict[str, float]:
    """Examples per second of split-server steps on ``device``, by precision."""
    import torch

    from hosfl_flower.config import resolve_run_config
    from hosfl_flower.data import sample_batch
    from hosfl_flower.split_server import SplitServer
    from hosfl_flower.task import client_task, server_model_and_test

    cfg = resolve_run_config(config)
    task = client_task(cfg, 1)
    batch = sample_batch(task.data.partition(0), cfg["batch-size"], cfg["seed"], 0, 1)
    with torch.no_grad():
        smashed = task.model.smash(batch.inputs)
    model, _ = server_model_and_test(cfg)
    precisions = ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")
    result = {}
    for precision in precisions:
        server = SplitServer(
            model, cfg["server.optimizer"], cfg["server.lr"], device=str(device), precision=precision, detach=True
        )
        for _ in range(2):
            server.step([(smashed, batch.labels)], [1.0])
        times = []
        for _ in range(max(repeats * 3, 3)):
            synchronize(device)
            start = time.perf_counter()
            server.step([(smashed, batch.labels)], [1.0])
            synchronize(device)
            times.append(time.perf_counter() - start)
        result[precision] = len(batch) / statistics.median(times)
        del server
    return result


def main() -> int:
    def options(parser) -> None:
        parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
        parser.add_argument("--out", default="gpu-benchmark.json", help="where the JSON results go")

    args = parse_args(__doc__.splitlines()[0], options)
    import torch

    from hosfl_flower.node.client import HOSFLClient

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks/gpu.py: skipped, no CUDA device here (--device {args.device}); --device cpu --quick runs on the CPU")
        return 0
    if device.type == "cpu":
        HOSFLClient.always_copy = True  # the nodes' device-copy path, on the CPU
    set_threads(1 if device.type == "cpu" else torch.get_num_threads())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    started = time.perf_counter()
    repeats = 1 if args.quick else 3
    tasks = {
        name: {**config, "client.device": args.device}
        for name, config in (("finetune", finetune_config(args.quick)), ("decoder", decoder_config(args.quick)))
    }
    results: dict[str, Any] = {"device": str(device), "device_name": where, "torch": torch.__version__, "quick": args.quick}
    results["client"] = {name: client_cases(name, config, device, repeats) for name, config in tasks.items()}
    results["server_examples_per_s"] = {name: server_throughput(config, device, repeats) for name, config in tasks.items()}
    results["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(results, indent=2))

    print(f"GPU benchmark on {where} ({device}; torch {torch.__version__}{', quick' if args.quick else ''})\n")
    for name, r in results["client"].items():
        size = f"d_c {r['client_params']:,} trainable of {r['model_params']:,} parameters"
        print(f"{name}: batch {r['batch_size']}, {size}, P {r['P']}")
        inference = r["memory"]["inference"]["peak_bytes"]
        rows = []
        for method, m in r["memory"].items():
            peak = m["peak_bytes"]
            rows.append(
                (
                    method,
                    "-" if peak is None else f"{mib(peak):.2f}",
                    "-" if peak is None or not inference else peak / inference,
                    "-" if m["held_bytes"] is None else f"{mib(m['held_bytes']):.1f}",
                )
            )
        print(table(("method", "peak MiB", "/ inference", "held MiB"), rows))
        print(
            f"probe step {r['step_s'] * 1e3:.2f} ms vs (P+1) forwards {(r['P'] + 1) * r['forward_s'] * 1e3:.2f} ms: "
            f"ratio {r['step_over_forwards']:.2f}; {mib(r['step_bytes_to_device']):.2f} MiB copied to the device per step, "
            f"θ_c {mib(r['theta_bytes']):.3f} MiB in {r['theta_copy_s'] * 1e3:.3f} ms per copy\n"
        )
    rows = [(name, *(f"{v:,.0f}" for v in by.values())) for name, by in results["server_examples_per_s"].items()]
    precisions = next(iter(results["server_examples_per_s"].values()))
    print(table(("server step", *(f"{p} ex/s" for p in precisions)), rows))
    print(f"\n({results['seconds']:.0f} s; results in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
