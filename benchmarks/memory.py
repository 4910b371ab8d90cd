"""Client peak memory of one step per method, side by side: HO-SFL vs inference-only and vs SplitFed (V2).

A method is ``inference`` or a registered protocol, whose step is its registered ``memory_step`` (the
protocol's own client handlers; :func:`hosfl_flower.memory.all_methods`). ``graph calls``: client-segment
module calls of one step that recorded an autograd graph (0 for the forward-only methods).

Each (configuration, method) case runs in its own subprocess (:func:`hosfl_flower.memory.measure_client_peak`);
two cases run at a time, which changes wall time only (each process measures its own resident set).

    python benchmarks/memory.py [--quick]
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from _common import LLM_CONFIG, machine, mib, parse_args, ratio_line, table

from hosfl_flower.memory import DEFAULT_METHODS, measure_client_peak

SPLITFED = "splitfed-v2"
CORE = ("inference", "hosfl", SPLITFED)
ALL_METHODS = DEFAULT_METHODS
"""inference, hosfl, heron-sfl, splitfed-v2, zo-sfl, fedavg, cse-fsl, fsl-sage, mu-splitfed."""
CASES = [
    # name, run config, methods, repeats, activations dominate (the HO-SFL / SplitFed target applies)
    ("cnn b32 (default)", {}, CORE, 5, False),
    ("cnn b1024", {"batch-size": 1024}, ALL_METHODS, 3, True),
    ("resnet cut3 b1024", {"model": "resnet", "cut-layer": 3, "batch-size": 1024}, CORE, 2, True),
    ("tiny-llama lora8 b256 T128", {**LLM_CONFIG, "batch-size": 256, "max-length": 128}, ALL_METHODS, 2, True),
]
QUICK_CASES = [("cnn b1024", {"batch-size": 1024}, ("inference", "hosfl", SPLITFED), 1, True)]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    cases = QUICK_CASES if args.quick else CASES
    started = time.perf_counter()
    jobs = [(name, config, method, repeats) for name, config, methods, repeats, _ in cases for method in methods]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            (name, method): pool.submit(measure_client_peak, method, config, repeats) for name, config, method, repeats in jobs
        }
        results = {key: future.result() for key, future in futures.items()}
    print(f"client peak memory of one step ({machine()}; backend {next(iter(results.values()))['backend']})\n")
    lines = []
    for name, _, methods, _, dominated in cases:
        by_method = {m: results[(name, m)] for m in methods}
        inference, splitfed = by_method["inference"]["bytes"], by_method[SPLITFED]["bytes"]
        first = by_method["inference"]
        print(f"{name}: batch {first['batch_size']}, z {first['z_numel']:,} floats, d_c {first['client_params']:,}")
        rows = [
            (
                m,
                f"{mib(r['bytes']):.2f}",
                r["bytes"] / inference,
                r["bytes"] / splitfed,
                r["graph_forwards"],
                ", ".join(f"{mib(s):.2f}" for s in r["samples"]),
            )
            for m, r in by_method.items()
        ]
        print(table(("method", "peak MiB", "/ inference", f"/ {SPLITFED}", "graph calls", "samples MiB"), rows), "\n")
        hosfl = by_method["hosfl"]["bytes"]
        lines.append(ratio_line(f"hosfl/inference [{name}]", hosfl / inference, 1.10))
        lines.append(ratio_line(f"hosfl/{SPLITFED} [{name}]", hosfl / splitfed, 0.40 if dominated else None))
    print(f"({time.perf_counter() - started:.0f} s)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
