"""Every strategy learns the digits through Flower's simulation engine (flower-simulation), on the same
model, data, partition and seed; SplitFed V1 and V2 agree with one client; HERON-SFL's server sees a
smashed batch every k local steps."""

import json
import math

import pytest
import torch

from hosfl_flower.config import DEFAULTS
from hosfl_flower.reference import run_reference


def _rows(results):
    return [json.loads(line) for line in (results / "rounds.jsonl").read_text().splitlines()]


# (strategy, extra run config, rounds, bar): bars sit below the accuracies measured with these settings
# (seed 0, 10 nodes, 3 per round, batch 32, IID, the CNN cut after block 2, P = 5, server AdamW 3e-3 —
# pinned in SETTINGS; the 5-seed comparison at the package defaults is in docs/tuning.md; chance is 0.10): splitfed-v2 0.775 at 25 rounds,
# splitfed-v1 0.844 at 50, fedavg 0.964 at 50, heron-sfl 0.867 at 25, zo-sfl 0.30 at 300 (test loss
# 2.310 -> 2.213). HO-SFL's own bar is in test_learning.py (0.93 at 200 rounds, bit-identical in Flower).
SETTINGS = "cut-layer=2 zo.num-perturbations=5 server.lr=0.003"
LEARNING = [
    ("splitfed-v2", "", 25, 0.65),
    ("splitfed-v1", "split-server.placement='ray'", 50, 0.70),
    ("fedavg", "", 50, 0.85),
    ("heron-sfl", "heron.lr=0.01", 25, 0.70),
    ("zo-sfl", "", 300, 0.20),
]


@pytest.mark.parametrize("strategy,extra,rounds,bar", LEARNING, ids=[s for s, *_ in LEARNING])
def test_strategy_learns_digits(simulate, strategy, extra, rounds, bar):
    _, results = simulate(f"strategy='{strategy}' num-server-rounds={rounds} eval-every={rounds // 2} {SETTINGS} {extra}")
    rows = _rows(results)
    assert len(rows) == rounds
    evaluated = [row for row in rows if "accuracy" in row]
    assert evaluated[-1]["accuracy"] >= bar, [row["accuracy"] for row in evaluated]
    assert evaluated[-1]["loss"] < math.log(10) - 0.05, [row["loss"] for row in evaluated]  # below a uniform guess
    summary = json.loads((results / "summary.json").read_text())
    assert summary["strategy"] == strategy


def test_frozen_client_stays_below_hosfl(simulate):
    """The frozen-client strategy equals the reference loop with P = 0, which HO-SFL beats (test_learning)."""
    _, results = simulate("strategy='frozen-client' num-server-rounds=30 eval-every=10", num_supernodes=4)
    final = torch.load(results / "final-model.pt")
    reference = run_reference({**final["config"], "zo.num-perturbations": 0, "strategy": "hosfl"}, 4)
    for segment in ("client", "server"):
        for name, tensor in getattr(reference.model, segment).state_dict().items():
            assert torch.equal(final[segment][name], tensor), name
    initial = run_reference({**final["config"], "num-server-rounds": 1, "zo.num-perturbations": 0, "strategy": "hosfl"}, 4)
    assert torch.equal(initial.model.client[0][0].weight, final["client"]["0.0.weight"])
    hosfl = run_reference({**final["config"], "strategy": "hosfl", "zo.num-perturbations": DEFAULTS["zo.num-perturbations"]}, 4)
    assert hosfl.history[-1]["accuracy"] >= _rows(results)[-1]["accuracy"]


def test_splitfed_v1_equals_v2_with_one_client(simulate, tmp_path):
    finals = {}
    for version in ("v1", "v2"):
        _, results = simulate(
            f"strategy='splitfed-{version}' num-server-rounds=3 clients-per-round=1 splitfed.local-steps=2 eval-every=3",
            num_supernodes=2,
        )
        finals[version] = torch.load(results / "final-model.pt")
        (results / "final-model.pt").rename(tmp_path / f"{version}.pt")
    for segment in ("client", "server"):
        for name, tensor in finals["v1"][segment].items():
            assert torch.equal(tensor, finals["v2"][segment][name]), f"{segment}.{name}"


def test_heron_server_sees_a_batch_every_k_steps(simulate):
    _, results = simulate(
        "strategy='heron-sfl' num-server-rounds=2 heron.local-steps=6 heron.upload-every=2 "
        "partitioner='dirichlet' eval-every=2",
        num_supernodes=4,
    )
    rows = _rows(results)
    assert all(row["server-batches"] == 3 * 3 and row["replies"] == 3 for row in rows)
    assert all(row["bytes.activations_up"] > 0 and row["bytes.model_up"] > 0 for row in rows)
