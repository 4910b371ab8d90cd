"""Client HO-SFL step time over (P+1) client forward passes, at several sizes.

The step is one round of a node's HO-SFL work, the ``hosfl`` memory case (the protocol's registered
``memory_step``): its ``train.smash`` handler (catching up one ledger entry) then its ``train.probe``
handler with ``P`` seeds (:mod:`hosfl_flower.protocols.hosfl.client`). The forward is
``model.smash(inputs)`` under ``torch.no_grad()`` on the same batch. Both are timed with ``time.perf_counter``, interleaved
(forward, step, forward, step, ...) so machine load hits both alike; medians are compared.

    python benchmarks/step_time.py [--quick] [--profile NAME] [--estimator forward|central|jvp] [--directions gaussian|rademacher]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time

from _common import LLM_CONFIG, machine, parse_args, ratio_line, set_threads, table

SIZES = [
    ("cnn b32 (default)", {}),
    ("cnn cut2 b32 P5", {"cut-layer": 2, "zo.num-perturbations": 5}),
    ("cnn b256", {"batch-size": 256}),
    ("cnn b1024", {"batch-size": 1024}),
    ("resnet cut3 b256", {"model": "resnet", "cut-layer": 3, "batch-size": 256}),
    ("tiny-llama lora8 b32 T24", dict(LLM_CONFIG)),
    ("tiny-llama lora8 b128 T128", {**LLM_CONFIG, "batch-size": 128, "max-length": 128}),
]
QUICK_SIZES = [SIZES[0], SIZES[2]]
TARGET = 1.25


def measure(config: dict, budget: float) -> dict:
    """Median forward, step, perturbation and catch-up seconds of one size."""
    import torch

    from hosfl_flower.config import resolve_run_config
    from hosfl_flower.data import sample_batch
    from hosfl_flower.memory import build_case
    from hosfl_flower.schedule import RoundSchedule
    from hosfl_flower.task import client_task
    from hosfl_flower.zo import SGD, LedgerEntry, perturb_, replay

    cfg = resolve_run_config(config)
    step, info = build_case("hosfl", cfg)
    task = client_task(cfg, 1)
    model, params = task.model, task.model.client_parameters()
    inputs = sample_batch(task.data.partition(0), cfg["batch-size"], cfg["seed"], 0, 2).inputs
    seeds = RoundSchedule(cfg["seed"]).seeds(cfg["zo.num-perturbations"])
    entry = LedgerEntry(1, seeds, tuple(1e-3 for _ in seeds), 0.0, cfg["zo.mu"])

    @torch.no_grad()
    def forward() -> None:
        model.smash(inputs)

    def perturbations() -> None:
        for seed in seeds:
            perturb_(params, seed, cfg["zo.mu"])
            perturb_(params, seed, -cfg["zo.mu"])

    def catch_up() -> None:
        replay(params, SGD(), [entry])  # lr 0: the parameters do not move

    step(), forward()  # warm-up
    timings: dict[str, list[float]] = {"forward": [], "step": [], "perturb": [], "catch-up": []}
    functions = {"forward": forward, "step": step, "perturb": perturbations, "catch-up": catch_up}
    deadline = time.perf_counter() + budget
    while len(timings["step"]) < 5 or (time.perf_counter() < deadline and len(timings["step"]) < 400):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    return {**medians, "P": len(seeds), "repeats": len(timings["step"]), **info}


def profile(config: dict, repeats: int = 50) -> str:
    """cProfile of ``repeats`` HO-SFL steps: the top functions by own time."""
    from hosfl_flower.config import resolve_run_config
    from hosfl_flower.memory import build_case

    step, _ = build_case("hosfl", resolve_run_config(config))
    step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeats):
        step()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


def main() -> None:
    def options(parser) -> None:
        parser.add_argument("--profile", metavar="NAME", help="also print a cProfile of this size's step")
        parser.add_argument("--estimator", default="forward", help="zo.estimator of every size")
        parser.add_argument("--directions", default="gaussian", help="zo.directions of every size")

    args = parse_args(__doc__.splitlines()[0], options)
    set_threads(1)
    variant = {"zo.estimator": args.estimator, "zo.directions": args.directions}
    sizes = [(name, {**config, **variant}) for name, config in (QUICK_SIZES if args.quick else SIZES)]
    budget = 2.0 if args.quick else 8.0
    started = time.perf_counter()
    rows, lines = [], []
    for name, config in sizes:
        r = measure(config, budget)
        forwards = (r["P"] + 1) * r["forward"]
        ratio = r["step"] / forwards
        rows.append(
            (
                name,
                r["batch_size"],
                r["client_params"],
                r["P"],
                r["forward"] * 1e3,
                r["step"] * 1e3,
                forwards * 1e3,
                ratio,
                r["perturb"] * 1e3,
                r["catch-up"] * 1e3,
                r["repeats"],
            )
        )
        lines.append(ratio_line(f"hosfl step/((P+1) forward) [{name}]", ratio, TARGET))
    print(
        f"HO-SFL client step time vs (P+1) forwards ({machine()}, 1 torch thread, "
        f"estimator {args.estimator}, {args.directions} directions)\n"
    )
    headers = ("size", "batch", "d_c", "P", "fwd ms", "step ms", "(P+1)fwd ms", "ratio", "2P perturb ms", "catch-up ms", "reps")
    print(table(headers, rows))
    print("\n2P perturb: the P perturb/restore pairs of the probe; catch-up: replaying one ledger entry (P directions).")
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.profile:
        print(profile(dict(sizes)[args.profile] if args.profile in dict(sizes) else {**dict(SIZES)[args.profile], **variant}))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
