"""Byte accounting: every record counted in its category; HO-SFL's aggregation is dimension-free."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hosfl_flower.accounting import RoundAccount, message_bytes, record_bytes
from hosfl_flower.config import resolve_run_config
from hosfl_flower.models import SplitCNN
from hosfl_flower.records import tensors_to_record
from hosfl_flower.strategies import HOSFLStrategy, NodeInfo
from hosfl_flower.strategies.hosfl import SmashedReply
from hosfl_flower.task import server_model_and_test
from hosfl_flower.zo import LedgerEntry


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield


def test_message_bytes_are_the_sum_of_record_count_bytes():
    z = tensors_to_record({"z": torch.randn(4, 8, 4, 4)})
    labels = tensors_to_record({"y": torch.arange(4)})
    meta = ConfigRecord({"num-examples": 4, "fingerprint": "ab" * 16})
    scalars = MetricRecord({"values": [0.1, -0.2, 0.3]})
    message = Message(RecordDict({"smashed": z, "labels": labels, "meta": meta, "scalars": scalars}), dst_node_id=7,
                      message_type="train.smash", group_id="1")
    expected = z.count_bytes() + labels.count_bytes() + meta.count_bytes() + scalars.count_bytes()
    assert message_bytes(message) == expected
    account = RoundAccount()
    account.count(message, "up")
    assert account.total_bytes == expected
    assert account.bytes["activations_up"] == z.count_bytes() and account.bytes["labels_up"] == labels.count_bytes()
    assert account.bytes["scalars_up"] == scalars.count_bytes() and account.bytes["other"] == meta.count_bytes()


def test_records_flower_cannot_count_are_still_counted():
    record = ConfigRecord({"fingerprint": "", "steps": []})
    assert record_bytes(record) == len("fingerprint") + len("steps")


def _hosfl_aggregation_bytes(model: SplitCNN) -> int:
    """Bytes one sampled node moves for aggregation in one HO-SFL round, built by the strategy itself:
    the ledger entry it lacks and the round's seeds (down), its P scalars (up)."""
    config = resolve_run_config({"results-dir": ""})
    _, test = server_model_and_test(config)
    strategy = HOSFLStrategy(model, test, config)
    seeds = strategy.schedule.seeds(config["zo.num-perturbations"])
    strategy.ledger.append(LedgerEntry(1, seeds, tuple(0.5 for _ in seeds), 0.1, 1e-3))
    node = NodeInfo(node_id=11, partition_id=0, num_examples=100)
    account = RoundAccount()
    account.count(strategy.message(node, "train.smash", 2, strategy.catch_up_records(node)), "down")
    strategy._round = {"seeds": seeds}
    z = model.smash({"x": torch.zeros(2, 1, 8, 8)})["z"]
    reply = SmashedReply(node, {"z": z}, torch.zeros(2, dtype=torch.long), 0.0)
    account.count(strategy.configure_probe(2, [reply], [torch.zeros_like(z)])[0], "down")
    up = RecordDict({"scalars": MetricRecord({"values": [0.25] * len(seeds)})})
    return account.bytes["seeds_and_ledger_down"] + sum(record_bytes(r) for r in up.values())


def test_hosfl_aggregation_is_dimension_free_and_fedavg_is_not():
    small, large = SplitCNN(cut_layer=2, width=8), SplitCNN(cut_layer=2, width=128)
    sizes = {m: (sum(p.numel() for p in m.client_parameters()), sum(p.numel() for p in m.parameters())) for m in (small, large)}
    assert sizes[large][0] >= 100 * sizes[small][0] and sizes[large][1] >= 100 * sizes[small][1]
    hosfl = [_hosfl_aggregation_bytes(m) for m in (small, large)]
    num_probes = resolve_run_config({})["zo.num-perturbations"]
    assert hosfl[0] == hosfl[1] and 0 < hosfl[0] < 40 * num_probes + 200  # O(P): seeds and scalars, never d_c
    # FedAvg and SplitFed move the model (FedAvg: whole, SplitFed: client segment) down and up
    fedavg = [2 * record_bytes(tensors_to_record(m.state_dict())) for m in (small, large)]
    splitfed = [2 * record_bytes(tensors_to_record(m.client_state())) for m in (small, large)]
    assert fedavg[1] >= 95 * fedavg[0] and splitfed[1] >= 95 * splitfed[0]
    assert splitfed[0] > 10 * hosfl[0]
