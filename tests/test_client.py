"""The node (HOSFLClient and HO-SFL's handlers): catch-up through the ledger, weight repair, probes
tied to their smash, and the weight store that keeps θ_c out of the message context."""

import pytest
import torch
from flwr.app import RecordDict

from hosfl_flower.data import load_federated_data
from hosfl_flower.models import build_split_model
from hosfl_flower.node.client import STATE_SYNC, ClientSettings, HOSFLClient, OutOfSyncError
from hosfl_flower.node.store import WeightStore
from hosfl_flower.protocols.hosfl import client as handlers
from hosfl_flower.protocols.hosfl.messages import ProbeRequest, SmashRequest, SyncRequest
from hosfl_flower.protocols.messages import CatchUp
from hosfl_flower.zo import LedgerEntry, apply_entry, fingerprint, make_client_optimizer

STORE = WeightStore(None)


def make_client(state, partition=0, store=None, model=None):
    model = model or build_split_model("cnn", 2, 10, seed=0)
    initial = {k: v.clone() for k, v in build_split_model("cnn", 2, 10, seed=0).client_state().items()}
    data = load_federated_data("digits", 4, "iid", 0.3, 0, 0.2).partition(partition)
    settings = ClientSettings(seed=0, partition_id=partition, batch_size=8, optimizer="adamw")
    return HOSFLClient(model, data, settings, initial, state, store or STORE, "test", partition)


def smash(client, server_round, entries, from_round, replacement=None, replacement_round=0):
    catch_up = CatchUp(from_round, list(entries), replacement, replacement_round)
    return handlers.smash(client, SmashRequest(catch_up), server_round)


def sync(client, entries, from_round, replacement=None, replacement_round=0):
    reply = handlers.sync(client, SyncRequest(CatchUp(from_round, list(entries), replacement, replacement_round)), 0)
    return reply.fingerprint, reply.applied_round


def probe(client, server_round, lam, seeds, mu):
    return handlers.probe(client, ProbeRequest(lam, tuple(seeds), mu), server_round).scalars


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
    smash(client, 2, ENTRIES[:1], from_round=0)
    assert client.applied_round == 1
    # rebuilt from the same context.state (as Flower does per message), it replays only what it lacks
    result = smash(make_client(state), 6, ENTRIES, from_round=1)
    replica, _ = replica_after(ENTRIES)
    assert result.applied_round == 5
    assert result.fingerprint == fingerprint(replica.client_parameters())
    restored = make_client(state)
    restored.restore()
    assert all(torch.equal(a, b) for a, b in zip(restored.model.client_parameters(), replica.client_parameters()))


def test_entries_already_applied_are_skipped():
    state = RecordDict()
    sync(make_client(state), ENTRIES[:3], from_round=0)
    fp, applied = sync(make_client(state), ENTRIES, from_round=0)  # the server never saw the first reply
    assert applied == 5 and fp == fingerprint(replica_after(ENTRIES)[0].client_parameters())


def test_node_older_than_the_server_thinks_is_repaired_by_weights():
    state = RecordDict()
    fp, applied = sync(make_client(state), ENTRIES[3:], from_round=3)  # state lost: it holds round 0 only
    replica, optimizer = replica_after(ENTRIES)
    assert applied == 0 and fp != fingerprint(replica.client_parameters())
    weights = dict(replica.client_state())
    weights.update({"optimizer." + k: v for k, v in optimizer.state_tensors().items()})
    fp, applied = sync(make_client(state), [], from_round=5, replacement=weights, replacement_round=5)
    assert applied == 5 and fp == fingerprint(replica.client_parameters())
    # and it keeps following the ledger exactly afterwards (optimizer state came along)
    nxt = LedgerEntry(6, (99, 100), (0.3, 0.1), 1e-3, 1e-3)
    fp, _ = sync(make_client(state), [nxt], from_round=5)
    apply_entry(replica.client_parameters(), optimizer, nxt)
    assert fp == fingerprint(replica.client_parameters())


def test_probe_needs_the_smash_of_its_round_and_leaves_theta_untouched():
    state = RecordDict()
    client = make_client(state)
    with pytest.raises(OutOfSyncError):
        probe(client, 1, torch.zeros(8, 16, 4, 4), [1, 2], 1e-3)
    result = smash(client, 1, [], from_round=0)
    with pytest.raises(OutOfSyncError):
        probe(make_client(state), 2, torch.zeros_like(result.batch.smashed["z"]), [1, 2], 1e-3)
    lam = torch.randn_like(result.batch.smashed["z"])
    scalars = probe(make_client(state), 1, lam, [1, 2, 3], 1e-3)
    assert len(scalars) == 3 and all(s != 0.0 for s in scalars)
    assert sync(make_client(state), [], from_round=0)[0] == result.fingerprint


# --------------------------------------------------------------------------- the weight store
def test_node_state_holds_only_the_version_not_the_weights(tmp_path):
    store = WeightStore(tmp_path)
    state = RecordDict()
    sync(make_client(state, store=store), ENTRIES[:2], from_round=0)
    assert set(state) == {STATE_SYNC}
    assert dict(state[STATE_SYNC]) == {
        "applied-round": 2,
        "fingerprint": fingerprint(replica_after(ENTRIES[:2])[0].client_parameters()),
    }
    assert sum(len(array.data) for record in state.array_records.values() for array in record.values()) == 0
    # another process (an empty memory cache) restores the version from the node's file
    other = WeightStore(tmp_path)
    fp, applied = sync(make_client(state, store=other), ENTRIES[:3], from_round=2)
    assert (fp, applied) == (fingerprint(replica_after(ENTRIES[:3])[0].client_parameters()), 3)


def test_a_tampered_or_missing_version_is_never_adopted(tmp_path):
    store = WeightStore(tmp_path)
    state = RecordDict()
    sync(make_client(state, store=store), ENTRIES[:2], from_round=0)
    path = next(tmp_path.rglob("node-*.pt"))
    saved = torch.load(path, weights_only=True)
    first = next(k for k in saved["tensors"] if not k.startswith("optimizer."))
    saved["tensors"][first] = saved["tensors"][first] + 1.0  # the file no longer hashes to its fingerprint
    torch.save(saved, path)
    fresh = WeightStore(tmp_path)
    fp, applied = sync(make_client(state, store=fresh), ENTRIES[2:3], from_round=2)
    initial = build_split_model("cnn", 2, 10, seed=0)
    assert applied == 0 and fp == fingerprint(initial.client_parameters())  # back to round 0: the server repairs it
    path.unlink()
    assert sync(make_client(RecordDict(dict(state)), store=WeightStore(tmp_path)), [], from_round=0)[1] == 0


# --------------------------------------------------------------------------- probe arithmetic and shared models
from hosfl_flower.zo import hybrid_probe_scalars, perturb_  # noqa: E402

SEEDS, MU = [7, 8, 9], 1e-3


def direct_probe(entries, batch_inputs, lam):
    """The probe computed straight from the zeroth-order engine on a replica (no node state, no cache)."""
    replica, _ = replica_after(entries)
    with torch.no_grad():
        z = replica.smash(batch_inputs)["z"]
    return hybrid_probe_scalars(lambda: replica.smash(batch_inputs)["z"], replica.client_parameters(), z, lam, SEEDS, MU)


def one_round(state, lam_seed=0, between=lambda: None, model=None, store=None):
    """Round 2 of a node that applied round 1: smash (replaying the entry), then probe."""
    client = make_client(state, model=model, store=store)
    result = smash(client, 2, ENTRIES[:1], from_round=0)
    lam = torch.randn(result.batch.smashed["z"].shape, generator=torch.Generator().manual_seed(lam_seed))
    between()
    scalars = probe(make_client(state, model=client.model, store=store), 2, lam, SEEDS, MU)
    return result, lam, scalars, client


def test_probe_matches_the_engine_drops_the_batch_and_leaves_theta_bit_identical():
    state = RecordDict()
    result, lam, scalars, client = one_round(state)
    batch = client.draw_batch(2)
    assert scalars == direct_probe(ENTRIES[:1], batch.inputs, lam)
    assert set(state) == {STATE_SYNC}  # the kept batch does not outlive its probe
    replica, _ = replica_after(ENTRIES[:1])
    assert result.fingerprint == fingerprint(replica.client_parameters())
    stored = STORE.get("test", 0, (1, result.fingerprint))
    assert all(torch.equal(stored[k], v) for k, v in replica.client_state().items())
    fp, applied = sync(make_client(state), [], from_round=0)
    assert (fp, applied) == (result.fingerprint, 1)
    restored = make_client(state, model=client.model)
    restored.restore()
    assert all(torch.equal(a, b) for a, b in zip(client.model.client_parameters(), replica.client_parameters()))


def scramble(model):
    with torch.no_grad():
        for p in model.client_parameters():
            p.add_(1.0)


def test_a_cache_miss_gives_the_same_answer(tmp_path):
    """Whether the process still holds the node's weights, holds other weights, or has forgotten
    everything, the probe and the fingerprints are the same bits."""
    store = WeightStore(tmp_path)
    baseline = one_round(RecordDict(), store=store)
    model = build_split_model("cnn", 2, 10, seed=0)
    variants = {
        "cache cleared": lambda: store.clear(),
        "model changed in place": lambda: scramble(model),
        "changed and cleared": lambda: (scramble(model), store.clear()),
        "other weights loaded": lambda: model.load_client_state(replica_after(ENTRIES[:4])[0].client_state()),
    }
    for name, between in variants.items():
        result, _, scalars, _ = one_round(RecordDict(), between=between, model=model, store=store)
        assert scalars == baseline[2], name
        assert result.fingerprint == baseline[0].fingerprint, name


def test_two_nodes_sharing_a_model_each_probe_their_own_weights():
    """Node A (one round behind) and node B (fresh) interleave on one shared model, as nodes of one
    ClientApp process do: each probe uses that node's θ_c."""
    model = build_split_model("cnn", 2, 10, seed=0)
    a_state, b_state = RecordDict(), RecordDict()
    a, b = make_client(a_state, model=model), make_client(b_state, partition=1, model=model)
    sync(a, ENTRIES[:1], from_round=0)
    ra = smash(a, 3, ENTRIES[1:2], from_round=1)  # A at round 2
    rb = smash(b, 3, [], from_round=0)  # B stays at the initial weights
    lam_a, lam_b = torch.randn_like(ra.batch.smashed["z"]), torch.randn_like(rb.batch.smashed["z"])
    scalars_b = probe(b, 3, lam_b, SEEDS, MU)
    scalars_a = probe(a, 3, lam_a, SEEDS, MU)
    assert scalars_a == direct_probe(ENTRIES[:2], a.draw_batch(3).inputs, lam_a)
    assert scalars_b == direct_probe([], b.draw_batch(3).inputs, lam_b)
    assert ra.fingerprint == fingerprint(replica_after(ENTRIES[:2])[0].client_parameters())


def test_the_store_notices_any_in_place_change_of_a_shared_model():
    model = build_split_model("cnn", 2, 10, seed=0)
    tag = (1, "x")
    STORE.mark(model, tag)
    assert STORE.holds(model, tag) and not STORE.holds(model, (1, "y"))
    perturb_(model.client_parameters(), 1, 1e-3)
    perturb_(model.client_parameters(), 1, -1e-3)
    assert not STORE.holds(model, tag)
    STORE.mark(model, tag)
    model.load_client_state(model.client_state())
    assert not STORE.holds(model, tag)
    STORE.mark(model, None)
    assert not STORE.holds(model, None)


def test_records_are_ordinary_flower_arrays():
    """The package's record encoding is the .npy format Flower writes, and decodes what Flower writes."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from hosfl_flower.records import record_to_tensors, tensors_to_record

    tensors = {
        "w": torch.randn(3, 4),
        "t": torch.randn(5, 6).t(),  # not contiguous
        "ids": torch.arange(12, dtype=torch.int64).reshape(2, 6),
        "step": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "half": torch.randn(4, dtype=torch.float16),
    }
    by_flower = ArrayRecord({name: Array(t.contiguous().numpy()) for name, t in tensors.items()})
    for _ in range(2):  # the second pass uses the cached headers
        ours = tensors_to_record(tensors)
        for name, t in tensors.items():
            assert np.array_equal(ours[name].numpy(), t.numpy()), name
            assert ours[name].data == by_flower[name].data, name
        back = record_to_tensors(ours)
        flower = record_to_tensors(by_flower)
        for name, t in tensors.items():
            assert torch.equal(back[name], t) and torch.equal(flower[name], t), name
            assert back[name].dtype == t.dtype and back[name].is_contiguous()
        back["w"].add_(1.0)  # decoded tensors are writable and owned
        assert torch.equal(record_to_tensors(ours)["w"], tensors["w"])
