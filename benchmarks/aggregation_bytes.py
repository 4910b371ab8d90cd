"""Dimension-free aggregation: bytes per sampled client and round of the client-segment aggregation traffic.

The messages of one round are built from the protocols' own typed messages (HO-SFL's ``train.smash``
with the catch-up its :class:`~hosfl_flower.protocols.hosfl.sync.LedgerSync` chooses, ``train.probe``
and their replies; SplitFed's ``train.splitfed_smash`` carrying ``θ_c`` and the last
``train.splitfed_grad`` reply carrying it back; FedAvg's ``train.fedavg`` and its reply), turned into
Flower messages as the Flower link does (:func:`hosfl_flower.flower.link.request_message`), and counted
by :meth:`hosfl_flower.accounting.RoundAccount.count` under the categories each message class declares
(Flower's ``count_bytes()`` per record):

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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from _common import LLM_CONFIG, local_llamas, machine, parse_args, ratio_line, table

NODE_ID, SERVER_ROUND = 7, 2
"""The measured node, and the round it takes part in (it also took part in round 1)."""


@contextmanager
def task_identity() -> Iterator[None]:
    """Flower builds messages only inside a task: give this process one while they are built (restored after)."""
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_run_id", "_task_id", "_node_id")
    saved = [getattr(TaskIdentity, name) for name in names]
    for name, value in zip(names, saved):
        setattr(TaskIdentity, name, 1 if value is None else value)
    try:
        yield
    finally:
        for name, value in zip(names, saved):
            setattr(TaskIdentity, name, value)


def exchange(request: Any, reply: Any) -> tuple[Counter, Counter]:
    """Bytes per accounting category of one request (as the Flower link sends it: typed request, then
    :func:`~hosfl_flower.flower.link.request_message`) and of its reply (as the ClientApp answers it),
    each counted by ``RoundAccount.count`` under its message class's declared categories."""
    from flwr.app import Message

    from hosfl_flower.accounting import RoundAccount
    from hosfl_flower.flower.link import CONFIG_CATEGORIES, request_message

    sent, received = RoundAccount(), RoundAccount()
    message = request_message(request, NODE_ID, SERVER_ROUND)
    sent.count(message, {**type(request).categories, **CONFIG_CATEGORIES})
    received.count(Message(reply.to_record(), reply_to=message), type(request).reply_type.categories)
    return sent.bytes, received.bytes


def measure(config: dict) -> dict:
    """Aggregation bytes per sampled client and round of HO-SFL, SplitFed and FedAvg for one model."""
    import torch

    from hosfl_flower.config import resolve_run_config
    from hosfl_flower.protocols import NodeInfo, SmashedBatch
    from hosfl_flower.protocols.fedavg.config import FedAvgSettings
    from hosfl_flower.protocols.fedavg.messages import FedAvgReply, FedAvgRequest
    from hosfl_flower.protocols.hosfl.config import HOSFLSettings
    from hosfl_flower.protocols.hosfl.messages import ProbeReply, ProbeRequest, SmashReply, SmashRequest
    from hosfl_flower.protocols.hosfl.sync import LedgerSync
    from hosfl_flower.protocols.splitfed.config import SplitFedSettings
    from hosfl_flower.protocols.splitfed.messages import (
        SplitFedGradReply,
        SplitFedGradRequest,
        SplitFedSmashReply,
        SplitFedSmashRequest,
    )
    from hosfl_flower.schedule import RoundSchedule
    from hosfl_flower.task import server_model_and_test
    from hosfl_flower.zo import LedgerEntry, fingerprint, make_client_optimizer

    cfg = resolve_run_config({**config, "results-dir": ""})
    model, test = server_model_and_test(cfg)
    batch = test.take(torch.arange(min(cfg["batch-size"], len(test))))
    with torch.no_grad():
        smashed = model.smash(batch.inputs)
    lam = torch.zeros_like(smashed["z"])  # λ's bytes are split-learning traffic: its values do not matter here

    # HO-SFL: the node took part in round 1, so its catch-up is round 1's ledger entry
    hosfl_settings = HOSFLSettings.from_config(cfg)
    num_probes, mu = hosfl_settings.num_perturbations, hosfl_settings.mu
    optimizer = make_client_optimizer(hosfl_settings.client_optimizer, hosfl_settings.client_weight_decay)
    sync = LedgerSync(model.client_parameters(), model.client_state, optimizer)
    schedule = RoundSchedule(cfg["seed"])
    previous = LedgerEntry(
        SERVER_ROUND - 1,
        schedule.seeds(num_probes),
        tuple(0.1 * (p + 1) for p in range(num_probes)),
        hosfl_settings.client_lr,
        mu,
        hosfl_settings.directions,
    )
    sync.ledger.append(previous)
    node = NodeInfo(node_id=NODE_ID, partition_id=0, num_examples=100)
    sync.node_discovered(node, previous.round - 1)
    seeds = tuple(schedule.seeds(num_probes))
    version = fingerprint(model.client_parameters())
    smash_down, smash_up = exchange(
        SmashRequest(sync.catch_up(node)), SmashReply(version, previous.round, SmashedBatch(smashed, batch.labels))
    )
    probe = ProbeRequest(lam, seeds, mu, hosfl_settings.estimator, hosfl_settings.directions)
    probe_down, probe_up = exchange(probe, ProbeReply([0.123456789 * (p + 1) for p in range(num_probes)]))
    hosfl = smash_down + smash_up + probe_down + probe_up

    # SplitFed (V1 and V2 move the same client-segment messages): θ_c down with the first step, up after the last
    splitfed_settings = SplitFedSettings.from_config(cfg)
    segment = {k: v.detach().clone() for k, v in model.client_state().items()}
    last = splitfed_settings.local_steps - 1
    first_down, first_up = exchange(SplitFedSmashRequest(0, segment), SplitFedSmashReply(SmashedBatch(smashed, batch.labels)))
    last_down, last_up = exchange(SplitFedGradRequest(lam, last, splitfed_settings.lr, True), SplitFedGradReply(segment))
    splitfed = first_down + first_up + last_down + last_up

    # FedAvg: the whole model down and up
    fedavg_settings = FedAvgSettings.from_config(cfg)
    whole = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fedavg_down, fedavg_up = exchange(
        FedAvgRequest(whole, fedavg_settings.local_steps, fedavg_settings.lr), FedAvgReply(whole, 100, 0.5)
    )
    fedavg = fedavg_down + fedavg_up
    return {
        "d_c": sum(p.numel() for p in model.client_parameters()),
        "model": sum(p.numel() for p in model.state_dict().values()),
        "P": num_probes,
        "hosfl": hosfl["scalars_up"] + hosfl["seeds_and_ledger_down"],
        "hosfl_other": hosfl["other"],
        "ledger_entry": smash_down["seeds_and_ledger_down"],
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
        with task_identity():
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
        "(or the weights once, when those cost more). HO-SFL's control records (sync, config, meta: other) add "
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
