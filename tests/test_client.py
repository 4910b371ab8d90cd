"""HOSFLClient's node state: catch-up through the ledger, weight repair, probes tied to their smash."""

import pytest
import torch
from flwr.app import RecordDict

from hosfl_flower.client import ClientSettings, HOSFLClient, OutOfSyncError
from hosfl_flower.data import load_federated_data
from hosfl_flower.models import build_split_model
from hosfl_flower.zo import LedgerEntry, apply_entry, fingerprint, make_client_optimizer


def make_client(state, partition=0):
    model = build_split_model("cnn", 2, 10, seed=0)
    initial = {k: v.clone() for k, v in model.client_state().items()}
    data = load_federated_data("digits", 4, "iid", 0.3, 0, 0.2).partition(partition)
    settings = ClientSettings(seed=0, partition_id=partition, batch_size=8, optimizer="adamw")
    return HOSFLClient(model, data, settings, initial, state)


def replica_after(entries):
    model = build_split_model("cnn", 2, 10, seed=0)
    optimizer = make_client_optimizer("adamw")
    for entry in entries:
        apply_entry(model.client_parameters(), optimizer, entry)
    return model, optimizer


ENTRIES = [LedgerEntry(t, (3 * t, 3 * t + 1), (0.01 * t, -0.02), 1e-3, 1e-3) for t in range(1, 6)]


def test_late_node_catches_up_bit_for_bit():
    state = RecordDict()
    client = make_client(state)
    client.smash(2, ENTRIES[:1], from_round=0)
    assert client.applied_round == 1
    # rebuilt from the same context.state (as Flower does per message), it replays only what it lacks
    result = make_client(state).smash(6, ENTRIES, from_round=1)
    replica, _ = replica_after(ENTRIES)
    assert result.applied_round == 5
    assert result.fingerprint == fingerprint(replica.client_parameters())
    restored = make_client(state)
    restored.restore()
    assert all(torch.equal(a, b) for a, b in zip(restored.model.client_parameters(), replica.client_parameters()))


def test_entries_already_applied_are_skipped():
    state = RecordDict()
    make_client(state).sync(ENTRIES[:3], from_round=0)
    fp, applied = make_client(state).sync(ENTRIES, from_round=0)  # the server never saw the first reply
    assert applied == 5 and fp == fingerprint(replica_after(ENTRIES)[0].client_parameters())


def test_node_older_than_the_server_thinks_is_repaired_by_weights():
    state = RecordDict()
    client = make_client(state)
    fp, applied = client.sync(ENTRIES[3:], from_round=3)  # state lost: it holds round 0 only
    replica, optimizer = replica_after(ENTRIES)
    assert applied == 0 and fp != fingerprint(replica.client_parameters())
    weights = dict(replica.client_state())
    weights.update({"optimizer." + k: v for k, v in optimizer.state_tensors().items()})
    fp, applied = make_client(state).sync([], from_round=5, replacement=weights, replacement_round=5)
    assert applied == 5 and fp == fingerprint(replica.client_parameters())
    # and it keeps following the ledger exactly afterwards (optimizer state came along)
    nxt = LedgerEntry(6, (99, 100), (0.3, 0.1), 1e-3, 1e-3)
    fp, _ = make_client(state).sync([nxt], from_round=5)
    apply_entry(replica.client_parameters(), optimizer, nxt)
    assert fp == fingerprint(replica.client_parameters())


def test_probe_needs_the_smash_of_its_round_and_leaves_theta_untouched():
    state = RecordDict()
    client = make_client(state)
    with pytest.raises(OutOfSyncError):
        client.probe(1, torch.zeros(8, 16, 4, 4), [1, 2], 1e-3)
    result = client.smash(1, [], from_round=0)
    with pytest.raises(OutOfSyncError):
        make_client(state).probe(2, torch.zeros_like(result.smashed["z"]), [1, 2], 1e-3)
    lam = torch.randn_like(result.smashed["z"])
    scalars, _ = make_client(state).probe(1, lam, [1, 2, 3], 1e-3)
    assert len(scalars) == 3 and all(s != 0.0 for s in scalars)
    assert make_client(state).sync([], from_round=0)[0] == result.fingerprint
