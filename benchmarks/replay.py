"""Ledger catch-up throughput: ``replay`` of N entries on a client segment vs raw ``torch.randn``.

Replay regenerates every direction from its seed and applies it: ``N × P × d_c`` parameter·directions.
The reference is ``torch.randn`` filling the same number of floats into a preallocated buffer with one
generator (the cost of the random numbers alone). Both run on one thread, interleaved, medians compared.

A last row measures the alternative to directions contract 2 that would make seeding free: a
counter-based generator (SplitMix64 of ``key + counter``, then Box-Muller), composed from torch's
elementwise integer and float operations, against ``torch.randn`` on the same number of floats.

    python benchmarks/replay.py [--quick]
"""

from __future__ import annotations

import math
import statistics
import time

from _common import LLM_CONFIG, local_llamas, machine, parse_args, ratio_line, set_threads, table

TARGET = 0.8
FLOATS_PER_RUN = 20_000_000
"""Work per timed replay (entries are added until ``N × P × d_c`` reaches it)."""


def segments(wide: list[str]) -> list[tuple[str, dict]]:
    """Client segments to replay on: small named models, then local wide Llamas (full fine-tuning)."""
    named = [
        ("cnn (default cut)", {}),
        ("tiny-llama lora8", dict(LLM_CONFIG)),
        ("tiny-llama full", {"model": "tiny-llama", "dataset": "sentiment"}),
    ]
    return named + [(f"llama {name} full", {"model": path, "dataset": "sentiment"}) for name, path in wide]


def measure(config: dict, budget: float) -> dict:
    """Median seconds of replaying N entries and of ``torch.randn`` for the same number of floats."""
    import torch

    from hosfl_flower.config import resolve_run_config
    from hosfl_flower.schedule import RoundSchedule
    from hosfl_flower.task import client_task
    from hosfl_flower.zo import SGD, LedgerEntry, replay

    cfg = resolve_run_config(config)
    model = client_task(cfg, 1).model
    params = model.client_parameters()
    d_c = sum(p.numel() for p in params)
    num_probes = cfg["zo.num-perturbations"]
    count = max(1, FLOATS_PER_RUN // (num_probes * d_c))
    schedule = RoundSchedule(cfg["seed"])
    scalars = tuple(1e-3 for _ in range(num_probes))
    entries = [LedgerEntry(r, schedule.seeds(num_probes), scalars, 1e-6, 1e-3) for r in range(1, count + 1)]
    floats = count * num_probes * d_c
    buffer = torch.empty(min(floats, 1 << 22))
    generator = torch.Generator().manual_seed(0)
    initial = [p.detach().clone() for p in params]

    def run_replay() -> None:
        replay(params, SGD(), entries)

    def run_randn() -> None:
        left = floats
        while left:
            n = min(left, buffer.numel())
            torch.randn(n, generator=generator, out=buffer[:n])
            left -= n

    run_replay(), run_randn()
    times: dict[str, list[float]] = {"replay": [], "randn": []}
    deadline = time.perf_counter() + budget
    while len(times["replay"]) < 3 or (time.perf_counter() < deadline and len(times["replay"]) < 50):
        for name, fn in (("replay", run_replay), ("randn", run_randn)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    with torch.no_grad():
        for p, value in zip(params, initial):
            p.copy_(value)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        **medians,
        "d_c": d_c,
        "tensors": len(params),
        "entries": count,
        "P": num_probes,
        "floats": floats,
        "repeats": len(times["replay"]),
    }


_MASK = (1 << 64) - 1


def _int64(value: int) -> int:
    """``value`` mod 2**64 as a signed 64-bit integer (what torch's int64 arithmetic wraps to)."""
    value &= _MASK
    return value - (1 << 64) if value >> 63 else value


def counter_based_normal(key: int, out) -> None:
    """Standard normal values ``2j, 2j + 1`` from SplitMix64's ``j``-th output of state ``key``, by
    Box-Muller, in torch elementwise operations (``out``: float32, even length; no generator to seed)."""
    import torch

    pairs = out.numel() // 2
    z = torch.arange(1, pairs + 1, dtype=torch.int64).mul_(_int64(0x9E3779B97F4A7C15)).add_(_int64(key))
    shifted = torch.empty_like(z)
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None)):
        torch.bitwise_right_shift(z, shift, out=shifted).bitwise_and_((1 << (64 - shift)) - 1)  # logical shift
        z.bitwise_xor_(shifted)
        if multiplier is not None:
            z.mul_(_int64(multiplier))
    radius = torch.bitwise_right_shift(z, 40).bitwise_and_(0xFFFFFF).float().add_(1.0).mul_(2.0**-24)
    radius.log_().mul_(-2.0).sqrt_()
    angle = z.bitwise_and_(0xFFFFFF).float().mul_(2.0 * math.pi * 2.0**-24)
    pairs_view = out.view(pairs, 2)
    torch.mul(radius, torch.cos(angle), out=pairs_view[:, 0])
    torch.mul(radius, angle.sin_(), out=pairs_view[:, 1])


def measure_counter_based(budget: float, floats: int = 1 << 16) -> float:
    """Median time of ``torch.randn`` over that of :func:`counter_based_normal` on ``floats`` values (a
    block of the stream), interleaved."""
    import torch

    out, buffer, generator = torch.empty(floats), torch.empty(floats), torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"counter": [], "randn": []}
    deadline = time.perf_counter() + budget
    while len(times["counter"]) < 20 or time.perf_counter() < deadline:
        for name, fn in (
            ("counter", lambda: counter_based_normal(12345, out)),
            ("randn", lambda: torch.randn(floats, generator=generator, out=buffer)),
        ):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["randn"]) / statistics.median(times["counter"])


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    set_threads(1)
    sizes = [(80, 160), (256, 1024)] if not args.quick else [(256, 1024)]
    started = time.perf_counter()
    rows, lines = [], []
    with local_llamas(*sizes) as paths:
        wide = [(f"h{h}", str(path)) for (h, _), path in zip(sizes, paths)]
        cases = segments(wide)
        if args.quick:
            cases = [cases[0], cases[-1]]
        for name, config in cases:
            r = measure(config, 1.5 if args.quick else 5.0)
            replay_rate, randn_rate = r["floats"] / r["replay"], r["floats"] / r["randn"]
            ratio = replay_rate / randn_rate
            rows.append(
                (name, r["d_c"], r["tensors"], r["entries"], r["P"], replay_rate / 1e6, randn_rate / 1e6, ratio, r["repeats"])
            )
            lines.append(ratio_line(f"replay/randn [{name}, d_c {r['d_c']:,}]", ratio, TARGET, above=True))
    print(f"seed replay throughput ({machine()}, 1 torch thread)\n")
    headers = ("client segment", "d_c", "tensors", "entries N", "P", "replay M param·dir/s", "randn M floats/s", "ratio", "reps")
    print(table(headers, rows))
    counter = measure_counter_based(0.5 if args.quick else 3.0)
    print(f"({time.perf_counter() - started:.0f} s)")
    print("\n".join(lines))
    print(f"ratio counter-based draw/randn [65 536 floats, torch elementwise ops] = {counter:.3f} (not taken by contract 2)")


if __name__ == "__main__":
    main()
