"""Byte accounting: every record counted in its category; HO-SFL's aggregation is dimension-free."""

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hosfl_flower.accounting import CATEGORIES, RoundAccount, message_bytes, record_bytes
from hosfl_flower.config import resolve_run_config
from hosfl_flower.flower.link import request_message
from hosfl_flower.models import SplitCNN
from hosfl_flower.protocols import NodeInfo
from hosfl_flower.protocols.hosfl.messages import ProbeReply, ProbeRequest, SmashReply, SmashRequest
from hosfl_flower.protocols.hosfl.sync import LedgerSync
from hosfl_flower.protocols.registry import all_payloads
from hosfl_flower.records import tensors_to_record
from hosfl_flower.schedule import RoundSchedule
from hosfl_flower.zo import LedgerEntry, make_client_optimizer


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield


def test_message_bytes_are_the_sum_of_record_count_bytes():
    z = tensors_to_record({"z": torch.randn(4, 8, 4, 4)})
    labels = tensors_to_record({"y": torch.arange(4)})
    meta = ConfigRecord({"num-examples": 4, "fingerprint": "ab" * 16})
    scalars = MetricRecord({"values": [0.1, -0.2, 0.3]})
    message = Message(
        RecordDict({"smashed": z, "labels": labels, "meta": meta, "scalars": scalars}),
        dst_node_id=7,
        message_type="train.smash",
        group_id="1",
    )
    expected = z.count_bytes() + labels.count_bytes() + meta.count_bytes() + scalars.count_bytes()
    assert message_bytes(message) == expected
    account = RoundAccount()
    account.count(message, {**SmashReply.categories, **ProbeReply.categories})
    assert account.total_bytes == expected
    assert account.bytes["activations_up"] == z.count_bytes() and account.bytes["labels_up"] == labels.count_bytes()
    assert account.bytes["scalars_up"] == scalars.count_bytes() and account.bytes["other"] == meta.count_bytes()


def test_records_flower_cannot_count_are_still_counted():
    record = ConfigRecord({"fingerprint": "", "steps": []})
    assert record_bytes(record) == len("fingerprint") + len("steps")


def _hosfl_aggregation_bytes(model: SplitCNN) -> int:
    """Bytes one sampled node moves for aggregation in one HO-SFL round, built from HO-SFL's own
    messages: the ledger entry it lacks and the round's seeds (down), its P scalars (up)."""
    config = resolve_run_config({"results-dir": ""})
    seeds = RoundSchedule(0).seeds(config["zo.num-perturbations"])
    sync = LedgerSync(model.client_parameters(), model.client_state, make_client_optimizer("sgd"))
    sync.ledger.append(LedgerEntry(1, seeds, tuple(0.5 for _ in seeds), 0.1, 1e-3))
    node = NodeInfo(node_id=11, partition_id=0, num_examples=100)
    account = RoundAccount()
    smash = SmashRequest(sync.catch_up(node))
    account.count(request_message(smash, node.node_id, 2), SmashRequest.categories)
    z = model.smash({"x": torch.zeros(2, 1, 8, 8)})["z"]
    probe = ProbeRequest(torch.zeros_like(z), tuple(seeds), 1e-3)
    account.count(request_message(probe, node.node_id, 2), ProbeRequest.categories)
    reply = Message(ProbeReply([0.25] * len(seeds)).to_record(), dst_node_id=0, message_type="train.probe", group_id="2")
    account.count(reply, ProbeReply.categories)
    return account.bytes["seeds_and_ledger_down"] + account.bytes["scalars_up"]


def test_every_record_of_every_registered_message_has_a_declared_category():
    """The accounting table is derived from the message types: nothing a protocol sends falls into ``other`` unseen."""
    for payload in all_payloads():
        assert set(payload.categories.values()) <= set(CATEGORIES), payload.__name__


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
