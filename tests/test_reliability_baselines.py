"""Faults and checkpoints for the other split strategies (HO-SFL's are in test_reliability.py)."""

import json

import pytest
import torch

from hosfl_flower.app import build_strategy
from hosfl_flower.checkpoint import save_checkpoint
from hosfl_flower.protocols.messages import SmashedBatch
from hosfl_flower.zo import LedgerEntry

from .conftest import ONE_ACTOR

FAULTS = "faults.failure-rate=0.3 faults.nan-partition=1 faults.wrong-count-partition=2"


@pytest.mark.parametrize("strategy", ["splitfed-v2", "heron-sfl", "zo-sfl"])
@pytest.mark.slow
def test_faulty_replies_never_reach_the_model(simulate, strategy):
    _, results = simulate(
        f"strategy='{strategy}' num-server-rounds=8 eval-every=1 clients-per-round=4 min-replies=2 "
        f"max-skipped-rounds=9 splitfed.local-steps=2 {FAULTS}",
        num_supernodes=10,
        extra_args=ONE_ACTOR,
    )
    final = torch.load(results / "final-model.pt")
    rows = [json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert all(bool(torch.isfinite(t).all()) for segment in ("client", "server") for t in final[segment].values())
    reasons = {key.split(".", 1)[1] for row in rows for key in row if key.startswith("rejected.")}
    assert "error" in reasons and "non-finite" in reasons and "wrong-shape" in reasons
    by_round = {row["round"]: row for row in rows}
    skipped = [row["round"] for row in rows if row.get("skipped")]
    kept = [row["round"] for row in rows if not row.get("skipped")]
    assert skipped and kept, (skipped, kept)
    for r in skipped:  # a skipped round leaves the model as it was (SplitFed V2 puts θ_s back)
        if r > 1:
            assert (by_round[r]["loss"], by_round[r]["accuracy"]) == (by_round[r - 1]["loss"], by_round[r - 1]["accuracy"])


def _touch(strategy):
    """Move every part of a strategy's state away from its initial values."""
    batch = strategy.test.take(torch.arange(8))
    with torch.no_grad():
        smashed = strategy.model.smash(batch.inputs)
    strategy.split_server.step([(smashed, batch.labels)], [1.0])
    with torch.no_grad():
        for param in strategy.model.client_parameters():
            param.add_(0.01)
    protocol = strategy.protocol
    if hasattr(protocol, "sync"):
        protocol.sync.append(LedgerEntry(1, (11, 12), (0.5, -0.25), 0.001, 1e-3))
    if hasattr(protocol, "aux_head"):
        with torch.no_grad():
            for param in protocol.aux_head.parameters():
                param.mul_(0.5)
    if hasattr(protocol, "buffer"):  # FSL-SAGE's stored uploads
        protocol.store([SmashedBatch({k: v.clone() for k, v in smashed.items()}, batch.labels.clone())])
    if hasattr(protocol, "scalar_bound"):  # MU-SplitFed's second reply bound
        protocol.scalar_bound.history.extend([0.5, 0.75])
    protocol.reply_bound.history.extend([1.25, 2.5])
    strategy.schedule.seeds(3)
    strategy.history = [{"round": 1, "loss": 1.5}]


@pytest.mark.parametrize(
    "name",
    [
        "hosfl",
        "frozen-client",
        "zo-sfl",
        "splitfed-v1",
        "splitfed-v2",
        "heron-sfl",
        "fedavg",
        "cse-fsl",
        "fsl-sage",
        "mu-splitfed",
    ],
)
def test_checkpoint_round_trip_restores_every_part(name, tmp_path):
    config = {"strategy": name, "client.optimizer": "adamw", "results-dir": "", "checkpoint-dir": str(tmp_path)}
    source = build_strategy(config)
    _touch(source)
    save_checkpoint(tmp_path, 1, source.cfg, source.checkpoint_state())
    target = build_strategy({**config, "resume": True})
    assert target.resume() == 1
    for key, tensor in source.model.state_dict().items():
        assert torch.equal(target.model.state_dict()[key], tensor), key
    saved, loaded = source.split_server.state()["optimizer"], target.split_server.state()["optimizer"]
    assert all(torch.equal(saved["state"][0][k], loaded["state"][0][k]) for k in saved["state"][0])
    assert target.schedule.seeds(2) == source.schedule.seeds(2)
    assert target.history == source.history
    if hasattr(source.protocol, "sync"):
        assert list(target.protocol.ledger) == list(source.protocol.ledger) and len(source.protocol.ledger) == 1
        saved_opt, loaded_opt = source.protocol.sync.optimizer.state_tensors(), target.protocol.sync.optimizer.state_tensors()
        assert saved_opt.keys() == loaded_opt.keys() and all(torch.equal(v, loaded_opt[k]) for k, v in saved_opt.items())
    if hasattr(source.protocol, "aux_head"):
        head = target.protocol.aux_head.state_dict()
        assert all(torch.equal(v, head[k]) for k, v in source.protocol.aux_head.state_dict().items())
    assert _same(target.protocol.state(), source.protocol.state())  # FSL-SAGE's uploads, MU-SplitFed's scalar bound
    assert list(target.protocol.reply_bound.history) == list(source.protocol.reply_bound.history)
    assert len(source.protocol.reply_bound.history) >= 2
    if name == "fsl-sage":
        assert len(target.protocol.buffer) == 1 and target.protocol.buffer[0].num_examples == 8
    if name == "mu-splitfed":
        assert list(target.protocol.scalar_bound.history) == [0.5, 0.75]


def _same(a, b) -> bool:
    """Equal nested containers of tensors (``torch.equal``) and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
