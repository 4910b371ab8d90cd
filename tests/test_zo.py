"""The zeroth-order engine: directions, estimator, optimizers, ledger replay (no Flower)."""

import math

import pytest
import torch
from torch import nn

from hosfl_flower.zo import (
    SGD,
    AdamW,
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


# --------------------------------------------------------------------------- reused generator and scratch
def fresh_direction(seed, index, shape):
    """The contract (docs/protocols.md, "HO-SFL", directions), spelled out: a new CPU generator seeded with mix_seed(seed, index)."""
    from hosfl_flower.zo import mix_seed

    return torch.randn(shape, generator=torch.Generator().manual_seed(mix_seed(seed, index)), dtype=torch.float32)


SHAPES = [(1,), (7,), (15,), (16,), (17,), (3, 5), (16, 1, 3, 3), (33, 31), (1 << 16,), ((1 << 16) + 3,), (300, 301)]


def test_reused_generator_and_scratch_draw_the_contract_stream():
    """Directions drawn by the reused, re-seeded generator (and into the reused buffer) equal fresh ones,
    whatever was drawn before them in the thread (large, small, other seeds) and in any order."""
    from hosfl_flower.zo import transient_direction

    order = [(seed, index, shape) for seed in (0, 5, 2**62 + 3) for index, shape in enumerate(SHAPES)]
    for seed, index, shape in order + order[::-1]:
        like = torch.empty(shape)
        expected = fresh_direction(seed, index, shape)
        assert torch.equal(direction(seed, index, like), expected)
        assert torch.equal(transient_direction(seed, index, like), expected)
    # a later draw may reuse the buffer of a transient one, never of an owned one
    owned = direction(3, 0, torch.empty(4, 4))
    transient_direction(4, 0, torch.empty(4, 4))
    assert torch.equal(owned, fresh_direction(3, 0, (4, 4)))
    # other dtypes get the float32 stream converted, as before
    assert torch.equal(transient_direction(9, 1, torch.empty(5, dtype=torch.float64)), fresh_direction(9, 1, (5,)).double())


def test_directions_in_another_thread_follow_the_contract():
    from concurrent.futures import ThreadPoolExecutor

    from hosfl_flower.zo import transient_direction

    def draw(seed):
        return [transient_direction(seed, i, torch.empty(s)).clone() for i, s in enumerate(SHAPES)]

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(draw, range(6)))
    for seed, drawn in enumerate(results):
        assert all(torch.equal(u, fresh_direction(seed, i, s)) for i, (u, s) in enumerate(zip(drawn, SHAPES)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perturb_and_replay_equal_the_fresh_generator_formula(dtype):
    """perturb_ and apply_entry are bit-identical to the same arithmetic with one fresh generator per draw."""
    params = [torch.randn(s, generator=torch.Generator().manual_seed(i), dtype=dtype) for i, s in enumerate(SHAPES[:9])]
    expected = [p.clone() for p in params]
    perturb_(params, 11, 1e-3, first_index=2)
    for i, p in enumerate(expected):
        p.add_(fresh_direction(11, i + 2, p.shape).to(dtype), alpha=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(params, expected))

    entry = LedgerEntry(1, (5, 6, 7), (0.2, -0.1, 0.05), 0.01, 1e-3)
    apply_entry(params, SGD(), entry)
    for i, p in enumerate(expected):
        grad = torch.zeros_like(p)
        for seed, c in zip(entry.seeds, entry.coefficients()):
            grad.add_(fresh_direction(seed, i, p.shape).to(dtype), alpha=c)
        p.add_(grad, alpha=-entry.lr)
    assert all(torch.equal(a, b) for a, b in zip(params, expected))


# --------------------------------------------------------------------------- the lean probe
def test_dot64_is_an_exact_product_float64_sum_and_leaves_inputs_alone():
    from hosfl_flower.zo import dot64

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        a, b = torch.randn(5, 7001, generator=gen, dtype=dtype), torch.randn(5, 7001, generator=gen, dtype=dtype)
        a0, b0 = a.clone(), b.clone()
        exact = float((a.double() * b.double()).sum())
        assert math.isclose(dot64(a, b, chunk=1000), exact, rel_tol=1e-12)
        assert math.isclose(dot64(a, b), exact, rel_tol=1e-12)
        assert torch.equal(a, a0) and torch.equal(b, b0)
    with pytest.raises(ValueError):
        dot64(torch.zeros(3), torch.zeros(4))


def conv_client(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))


def test_lean_probe_scalars_match_the_straightforward_formula():
    """v_p = <λ, z̃_p> − <λ, z> (float64 products) agrees with <λ, z̃_p − z> to ~1e-6 relative, for a
    tensor anchor and for an anchor folded into a float; both anchors give the same bits."""
    from hosfl_flower.zo import dot64

    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    seeds, mu = [3, 4, 5, 6], 1e-3
    model = conv_client()
    params = trainable_parameters(model)
    with torch.no_grad():
        z = model(x)
    lam = torch.randn(z.shape, generator=torch.Generator().manual_seed(2)) / z.numel()
    start = [p.detach().clone() for p in params]
    lean = hybrid_probe_scalars(lambda: model(x), params, z, lam, seeds, mu)

    with torch.no_grad():  # the same perturbations, in the same order, from the same start
        for p, s in zip(params, start):
            p.copy_(s)
    folded = hybrid_probe_scalars(lambda: model(x), params, dot64(lam, z), lam, seeds, mu)
    assert folded == lean

    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
        straightforward = []
        for seed in seeds:
            perturb_(params, seed, mu)
            perturbed = model(x)
            perturb_(params, seed, -mu)
            straightforward.append(float(torch.sum((perturbed - z) * lam, dtype=torch.float64)))
    assert all(v != 0.0 for v in lean)
    for a, b in zip(lean, straightforward):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0), (a, b)
    with pytest.raises(ValueError, match="shape"):
        hybrid_probe_scalars(lambda: model(x), params, z, lam[:1], seeds, mu)


def test_probe_releases_each_output_before_the_next_forward():
    """At most one perturbed output is alive at a time: the previous z̃ is gone when the next forward runs."""
    import weakref

    model = conv_client()
    params = trainable_parameters(model)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        z = model(x)
    previous: list[weakref.ref] = []

    def forward():
        assert all(ref() is None for ref in previous), "a perturbed output from an earlier probe is still alive"
        out = model(x)
        previous.append(weakref.ref(out))
        return out

    scalars = hybrid_probe_scalars(forward, params, float(z.sum()), torch.ones_like(z), [1, 2, 3], 1e-3)
    assert len(scalars) == 3 and len(previous) == 3


def test_probe_with_kept_directions_equals_redrawing_them(monkeypatch):
    """Small segments draw each probe's directions once for perturbing and restoring; the scalars and the
    parameters left behind are the same bits as with perturb_ drawing them twice."""
    import hosfl_flower.zo.estimator as estimator
    from hosfl_flower.zo import draw_directions_

    x = torch.randn(8, 1, 8, 8)
    runs = []
    for keep in (1 << 16, 0):
        monkeypatch.setattr(estimator, "KEEP_DIRECTIONS_FLOATS", keep)
        model = conv_client()
        params = trainable_parameters(model)
        with torch.no_grad():
            z = model(x)
        scalars = hybrid_probe_scalars(lambda: model(x), params, z, torch.ones_like(z), [4, 5, 6], 1e-2)
        runs.append((scalars, [p.detach().clone() for p in params]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    buffers = [torch.empty(s) for s in SHAPES[:6]]
    draw_directions_(buffers, 21, first_index=3)
    assert all(torch.equal(u, fresh_direction(21, i + 3, u.shape)) for i, u in enumerate(buffers))
    with pytest.raises(ValueError):
        draw_directions_([torch.empty(3, dtype=torch.float64)], 1)


def test_fingerprint_format_is_stable():
    """Fingerprints are compared across processes, runs and checkpoints: the digest of known tensors is pinned."""
    assert fingerprint([torch.ones(10)]) == "7a0e815abd42ebac3c8a7031e1a59123"
    assert fingerprint([torch.zeros(0), torch.arange(5)]) == "de7def6d821cb63727b0bc747addb6ed"
    assert fingerprint([torch.ones(4, 4).t()]) == fingerprint([torch.ones(4, 4)])
