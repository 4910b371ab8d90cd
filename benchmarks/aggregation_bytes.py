"""Dimension-free aggregation: bytes per sampled client and round of the client-segment aggregation traffic.

Records are built by the package's own code (the HO-SFL strategy's catch-up records, the records the
probe exchange carries, ``tensors_to_record`` of the weights) and counted with Flower's
``count_bytes()`` under the categories of :mod:`hosfl_flower.accounting`:

- HO-SFL: ``scalars_up`` (``P`` scalars) + ``seeds_and_ledger_down`` (the round's seeds, and the one
  ledger entry a node that took part in the previous round lacks);
- SplitFed: ``model_up`` + ``model_down`` of the client segment;
- FedAvg: ``model_up`` + ``model_down`` of the whole model.

Split-learning traffic every split method shares (``z`` up, ``λ`` down) is not aggregation and is left out.

    python benchmarks/aggregation_bytes.py [--quick]
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping

from _common import LLM_CONFIG, local_llamas, machine, parse_args, ratio_line, table


def categorise(records: Mapping[str, object], direction: str) -> Counter:
    """Bytes per accounting category, exactly as ``RoundAccount.count`` files a message's records."""
    from hosfl_flower.accounting import RECORD_CATEGORIES, record_bytes

    counts: Counter = Counter()
    for name, record in records.items():
        counts[RECORD_CATEGORIES.get((direction, name.split(".", 1)[0]), "other")] += record_bytes(record)
    return counts


def measure(config: dict) -> dict:
    """Aggregation bytes per sampled client and round of HO-SFL, SplitFed and FedAvg for one model."""
    from flwr.app import ConfigRecord, MetricRecord

    from hosfl_flower.config import resolve_run_config
    from hosfl_flower.records import tensors_to_record
    from hosfl_flower.schedule import RoundSchedule
    from hosfl_flower.strategies import HOSFLStrategy
    from hosfl_flower.strategies.base import NodeInfo
    from hosfl_flower.task import server_model_and_test
    from hosfl_flower.zo import LedgerEntry

    cfg = resolve_run_config({**config, "results-dir": ""})
    model, test = server_model_and_test(cfg)
    strategy = HOSFLStrategy(model, test, cfg)
    schedule = RoundSchedule(cfg["seed"])
    num_probes, mu = cfg["zo.num-perturbations"], cfg["zo.mu"]
    previous = LedgerEntry(1, schedule.seeds(num_probes), tuple(0.1 * (p + 1) for p in range(num_probes)), cfg["client.lr"], mu)
    strategy.ledger.append(previous)
    node = NodeInfo(node_id=7, partition_id=0, num_examples=100)
    strategy.node_applied[node.node_id] = previous.round - 1  # took part in the previous round

    seeds = schedule.seeds(num_probes)
    hosfl = categorise(strategy.catch_up_records(node), "down")  # train.smash: sync + ledger
    hosfl += categorise({"seeds": ConfigRecord({"seeds": list(seeds), "mu": mu})}, "down")  # train.probe
    hosfl += categorise({"scalars": MetricRecord({"values": [0.123456789 * (p + 1) for p in range(num_probes)]})}, "up")
    entry_bytes = categorise(strategy.catch_up_records(node), "down")["seeds_and_ledger_down"]

    segment = tensors_to_record(model.client_state())
    splitfed = categorise({"arrays": segment}, "down") + categorise({"arrays": segment}, "up")
    whole = tensors_to_record(model.state_dict())
    fedavg = categorise({"arrays": whole}, "down") + categorise({"arrays": whole}, "up")
    return {
        "d_c": sum(p.numel() for p in model.client_parameters()),
        "model": sum(p.numel() for p in model.state_dict().values()),
        "P": num_probes,
        "hosfl": hosfl["scalars_up"] + hosfl["seeds_and_ledger_down"],
        "hosfl_other": hosfl["other"],
        "ledger_entry": entry_bytes,
        "splitfed": splitfed["model_up"] + splitfed["model_down"],
        "fedavg": fedavg["model_up"] + fedavg["model_down"],
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    sizes = [(80, 160), (256, 1024)]
    with local_llamas(*sizes) as (h80, h256):
        cases = [
            ("cnn cut2", {}),
            ("tiny-llama lora8", dict(LLM_CONFIG)),
            ("tiny-llama full", {"model": "tiny-llama", "dataset": "sentiment"}),
            ("llama h80 full", {"model": str(h80), "dataset": "sentiment"}),
            ("llama h256 full", {"model": str(h256), "dataset": "sentiment"}),
        ]
        if args.quick:
            cases = [cases[0], cases[3]]
        results = {name: measure(config) for name, config in cases}
    print(f"aggregation bytes per sampled client and round ({machine()})\n")
    rows = [
        (
            name,
            r["d_c"],
            r["model"],
            r["P"],
            r["hosfl"],
            r["ledger_entry"],
            r["splitfed"],
            r["fedavg"],
            r["hosfl"] / r["splitfed"],
            r["hosfl"] / r["fedavg"],
        )
        for name, r in results.items()
    ]
    headers = (
        "client segment",
        "d_c",
        "whole model",
        "P",
        "HO-SFL B",
        "1 ledger entry B",
        "SplitFed B",
        "FedAvg B",
        "HO-SFL/SplitFed",
        "HO-SFL/FedAvg",
    )
    print(table(headers, rows))
    print("\nHO-SFL B = P scalars up + seeds and one ledger entry down; a node that missed M rounds gets M entries")
    print(
        "(or the weights once, when those cost more). HO-SFL's 'sync' record (other) adds "
        f"{next(iter(results.values()))['hosfl_other']} B."
    )
    print(f"({time.perf_counter() - started:.0f} s)")
    pairs = [("cnn cut2", "llama h80 full"), ("tiny-llama full", "llama h256 full")]
    for small, large in pairs:
        if small in results and large in results:
            lo, hi = results[small], results[large]
            scale = hi["d_c"] / lo["d_c"]
            at = f"at {scale:.0f}x d_c / at d_c [{large} vs {small}]"
            print(ratio_line(f"hosfl bytes {at}", hi["hosfl"] / lo["hosfl"]))
            print(ratio_line(f"splitfed bytes {at}", hi["splitfed"] / lo["splitfed"]))
    for name, r in results.items():
        print(ratio_line(f"hosfl/splitfed bytes [{name}, d_c {r['d_c']:,}]", r["hosfl"] / r["splitfed"]))
        print(ratio_line(f"hosfl/fedavg bytes [{name}, d_c {r['d_c']:,}]", r["hosfl"] / r["fedavg"]))


if __name__ == "__main__":
    main()
