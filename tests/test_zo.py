"""The zeroth-order engine: directions, estimator, optimizers, ledger replay (no Flower)."""

import math

import pytest
import torch
from torch import nn

from hosfl_flower.zo import (
    AdamW,
    SGD,
    Ledger,
    LedgerEntry,
    aggregate_scalars,
    apply_entry,
    direction,
    estimate_gradient,
    fingerprint,
    hybrid_probe_scalars,
    make_client_optimizer,
    perturb_,
    replay,
    trainable_names,
    trainable_parameters,
)


def tiny_client(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


def test_same_seed_same_bits_and_different_seeds_differ():
    like = torch.empty(3, 7)
    a, b = direction(123, 0, like), direction(123, 0, like)
    assert torch.equal(a, b)
    assert not torch.equal(a, direction(124, 0, like))
    assert not torch.equal(a, direction(123, 1, like))
    assert a.dtype == torch.float32 and a.shape == like.shape


def test_direction_follows_the_contract_stream():
    """u for parameter i is the float32 randn stream of a CPU generator seeded from (seed, i)."""
    from hosfl_flower.zo import mix_seed

    like = torch.empty(4, 2, dtype=torch.float64)
    expected = torch.randn(4, 2, generator=torch.Generator().manual_seed(mix_seed(9, 3)), dtype=torch.float32)
    got = direction(9, 3, like)
    assert got.dtype == torch.float64
    assert torch.equal(got, expected.double())


def test_trainable_set_is_named_parameters_order_requires_grad_only():
    model = tiny_client()
    model[0].bias.requires_grad_(False)
    assert trainable_names(model) == ["0.weight", "2.weight", "2.bias"]
    assert [p.shape for p in trainable_parameters(model)] == [(5, 6), (4, 5), (4,)]
    before = model[0].bias.detach().clone()
    perturb_(trainable_parameters(model), seed=5, scale=0.1)
    assert torch.equal(model[0].bias, before), "frozen parameters must never be perturbed"


def test_perturb_then_restore_is_close():
    model = tiny_client()
    params = trainable_parameters(model)
    before = [p.detach().clone() for p in params]
    perturb_(params, 77, 1e-3)
    assert not all(torch.equal(a, b) for a, b in zip(before, params))
    perturb_(params, 77, -1e-3)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, params))


def test_estimator_matches_backprop_gradient():
    """Mean of many probes has cosine > 0.9 with the true client gradient J_cᵀ λ."""
    model = tiny_client().double()
    params = trainable_parameters(model)
    x = torch.randn(8, 6, dtype=torch.float64)
    lam = torch.randn(8, 4, dtype=torch.float64)
    z = model(x)
    true = torch.autograd.grad(z, params, grad_outputs=lam)
    with torch.no_grad():
        z = model(x)
    seeds = list(range(4000))
    scalars = hybrid_probe_scalars(lambda: model(x), params, z, lam, seeds, mu=1e-4)
    estimate = estimate_gradient(params, seeds, scalars, mu=1e-4)
    flat_true = torch.cat([g.flatten() for g in true])
    flat_est = torch.cat([g.flatten() for g in estimate])
    cosine = torch.nn.functional.cosine_similarity(flat_true, flat_est, dim=0)
    assert cosine > 0.9, float(cosine)
    # a single probe is a poor estimate: the test is not trivially satisfied
    one = torch.cat([g.flatten() for g in estimate_gradient(params, seeds[:1], scalars[:1], mu=1e-4)])
    assert torch.nn.functional.cosine_similarity(flat_true, one, dim=0) < 0.9


def test_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    ours = torch.randn(5, 3)
    ref = nn.Parameter(ours.clone())
    opt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.1, foreach=False)
    mine = AdamW(weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(5, 3)
        ref.grad = grad.clone()
        opt.step()
        mine.begin_step()
        mine.step_param(0, ours, grad, lr=0.01)
    assert torch.allclose(ours, ref.detach(), atol=1e-6)


def test_optimizer_state_round_trip_and_bad_state():
    opt = AdamW()
    p = torch.zeros(3)
    opt.begin_step()
    opt.step_param(0, p, torch.ones(3), 0.1)
    clone = AdamW()
    clone.load_state_tensors(opt.state_tensors())
    assert clone.step == 1 and torch.equal(clone.exp_avg[0], opt.exp_avg[0])
    with pytest.raises(ValueError, match="stateless"):
        SGD().load_state_tensors({"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown client optimizer 'lion'"):
        make_client_optimizer("lion")


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_replay_reproduces_the_replica_bit_for_bit(name):
    """A node that applies rounds one at a time equals one that catches up on all of them at once."""
    entries = [LedgerEntry(t, (t * 11, t * 13 + 1), (0.3 / t, -0.2), 0.05, 1e-3) for t in range(1, 8)]
    a, b = tiny_client(), tiny_client()
    opt_a, opt_b = make_client_optimizer(name), make_client_optimizer(name)
    for entry in entries:
        apply_entry(trainable_parameters(a), opt_a, entry)
    replay(trainable_parameters(b), opt_b, entries[:3])
    replay(trainable_parameters(b), opt_b, entries[3:])
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert fingerprint(trainable_parameters(a)) == fingerprint(trainable_parameters(b))
    c = tiny_client()
    replay(trainable_parameters(c), make_client_optimizer(name), entries[:-1])
    assert fingerprint(trainable_parameters(c)) != fingerprint(trainable_parameters(a))


def test_fingerprint_sees_one_bit():
    t = torch.ones(10)
    u = t.clone()
    u.view(torch.int32)[3] ^= 1
    assert fingerprint([t]) != fingerprint([u])
    assert fingerprint([t]) == fingerprint([t.clone()])


def test_ledger_since_and_order():
    ledger = Ledger()
    for t in (1, 2, 4, 7):
        ledger.append(LedgerEntry(t, (t,), (0.0,), 0.1, 1e-3))
    assert [e.round for e in ledger.since(0)] == [1, 2, 4, 7]
    assert [e.round for e in ledger.since(2)] == [4, 7]
    assert [e.round for e in ledger.since(3)] == [4, 7]
    assert ledger.since(7) == [] and ledger.last_round == 7
    with pytest.raises(ValueError, match="increasing rounds"):
        ledger.append(LedgerEntry(7, (1,), (0.0,), 0.1, 1e-3))
    with pytest.raises(ValueError, match="2 seeds but 1 scalars"):
        LedgerEntry(8, (1, 2), (0.0,), 0.1, 1e-3)


def test_aggregate_scalars_sums_and_rescales():
    assert aggregate_scalars([[1.0, 2.0], [3.0, 4.0]], 10, 10) == (4.0, 6.0)
    assert aggregate_scalars([[1.0, 2.0]], 5, 10) == (2.0, 4.0)
    with pytest.raises(ValueError):
        aggregate_scalars([[1.0], [1.0, 2.0]], 2, 2)


def test_coefficients_follow_the_estimator_normalisation():
    entry = LedgerEntry(1, (1, 2), (0.5, -1.0), 0.1, 1e-3)
    assert entry.coefficients() == [0.5 / 2e-3, -1.0 / 2e-3]
    assert math.isclose(sum(entry.coefficients()), -250.0)
