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
    estimate_gradient,
    fingerprint,
    hybrid_probe_scalars,
    make_client_optimizer,
    perturb_,
    replay,
    seed_direction,
    stream_values,
    trainable_names,
    trainable_parameters,
)


def tiny_client(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


def test_same_seed_same_bits_and_different_seeds_differ():
    like = [torch.empty(3, 7), torch.empty(5)]
    a, b = seed_direction(like, 123), seed_direction(like, 123)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], seed_direction(like, 124)[0])
    assert not torch.equal(a[0], seed_direction(like, 123, offset=1)[0])
    assert all(u.dtype == torch.float32 and u.shape == t.shape for u, t in zip(a, like))


def test_direction_follows_the_contract_stream():
    """u over [W (4×2, float64), b (3)] is the first 11 values of block 0 of seed 9's stream: the float32 randn
    of a CPU generator seeded with mix_seed(2, 9, 0), W taking 8 and b the next 3."""
    from hosfl_flower.zo import mix_seed

    expected = torch.randn(16, generator=torch.Generator().manual_seed(mix_seed(2, 9, 0)), dtype=torch.float32)
    weight, bias = seed_direction([torch.empty(4, 2, dtype=torch.float64), torch.empty(3)], 9)
    assert weight.dtype == torch.float64 and torch.equal(weight, expected[:8].view(4, 2).double())
    assert torch.equal(bias, expected[8:11])


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


# --------------------------------------------------------------------------- the stream contract
BLOCK = 1 << 16


def contract_stream(seed, start, count):
    """The contract (docs/protocols.md, "Directions"), spelled out: block k of seed's stream is torch.randn(65536)
    from a fresh CPU generator seeded with mix_seed(2, seed, k); the blocks laid end to end."""
    from hosfl_flower.zo import mix_seed

    first, last = start // BLOCK, (start + count - 1) // BLOCK
    blocks = [
        torch.randn(BLOCK, generator=torch.Generator().manual_seed(mix_seed(2, seed, k)), dtype=torch.float32)
        for k in range(first, last + 1)
    ]
    at = start - first * BLOCK
    return torch.cat(blocks)[at : at + count]


SHAPES = [(1,), (7,), (15,), (16,), (17,), (3, 5), (16, 1, 3, 3), (33, 31), (1 << 16,), ((1 << 16) + 3,), (300, 301)]
OFFSETS = [0, 1, 17, BLOCK - 3, 3 * BLOCK + 5]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("offset", OFFSETS)
def test_every_draw_follows_the_contract_stream(offset):
    """The stream, owned directions and the perturbation of float32 and float64 parameters all equal the
    contract's values, whatever was drawn before them in the thread (other layouts, other seeds, any order)."""
    total = sum(math.prod(s) for s in SHAPES)
    order = [(seed, shapes) for seed in (0, 5, 2**62 + 3) for shapes in (SHAPES, SHAPES[::-1], SHAPES[:4])]
    for seed, shapes in order + order[::-1]:
        count = sum(math.prod(s) for s in shapes)
        expected = contract_stream(seed, offset, count)
        assert torch.equal(stream_values(seed, offset, count), expected)
        assert torch.equal(flat(seed_direction([torch.empty(s) for s in shapes], seed, offset)), expected)
        for dtype in (torch.float32, torch.float64):
            params = [torch.zeros(s, dtype=dtype) for s in shapes]
            perturb_(params, seed, 1.0, offset)
            assert torch.equal(flat(params), expected.to(dtype))
    assert total > 2 * BLOCK  # the layout spans several blocks and cuts parameters at their edges


def test_the_contract_is_pinned_to_literal_values():
    """Directions contract 2 as numbers, not as the package's own functions: a change of the seed mix, the
    block layout or the draw changes these. The generator seeds and the Rademacher signs are exact; the
    Gaussian values are those of torch's CPU ``normal_`` (allowed a few float32 ulps, in case a CPU's
    vectorised transform rounds its last bit otherwise)."""
    from hosfl_flower.zo.directions import DIRECTIONS_CONTRACT, STREAM_BLOCK, block_seed

    assert DIRECTIONS_CONTRACT == 2 and STREAM_BLOCK == 65_536
    assert block_seed(7, 0) == 6_130_908_453_346_062_096
    assert block_seed(2**62 + 3, 5) == 6_362_640_560_752_039_622
    first = [0.011522872373461723, 1.4896767139434814, -0.038780879229307175, -0.2890503704547882, 0.9177350997924805]
    assert stream_values(7, 0, 5).tolist() == pytest.approx(first, rel=1e-6, abs=1e-7)
    in_block_3 = [-0.23349608480930328, 0.4941251277923584, 0.16042357683181763, 1.1194487810134888]
    assert stream_values(7, 3 * BLOCK + 10, 4).tolist() == pytest.approx(in_block_3, rel=1e-6, abs=1e-7)
    assert stream_values(123, 0, 8, "rademacher").tolist() == [-1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0]


def test_a_segment_continues_the_stream_of_the_one_before_it():
    """Two segments (client, then server at offset d_c) together draw exactly the direction of their concatenation."""
    client, server = [torch.zeros(s) for s in SHAPES[:6]], [torch.zeros(s) for s in SHAPES[6:]]
    perturb_(client, 31, 1.0)
    perturb_(server, 31, 1.0, offset=sum(p.numel() for p in client))
    whole = [torch.zeros(s) for s in SHAPES]
    perturb_(whole, 31, 1.0)
    assert torch.equal(flat(client + server), flat(whole))


def test_directions_are_the_same_bits_in_other_threads_and_thread_counts():
    from concurrent.futures import ThreadPoolExecutor

    def draw(seed):
        params = [torch.zeros(s) for s in SHAPES]
        perturb_(params, seed, 1.0)
        return flat(params)

    total = sum(math.prod(s) for s in SHAPES)
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            with ThreadPoolExecutor(max_workers=2) as pool:
                results = list(pool.map(draw, range(4)))
            assert all(torch.equal(u, contract_stream(seed, 0, total)) for seed, u in enumerate(results))
    finally:
        torch.set_num_threads(threads)


def test_the_gaussian_stream_is_standard_normal():
    """Over 10⁶ values (100 seeds × 10 000, crossing block edges): mean within 5σ of 0, variance within 5σ of 1,
    the share beyond 1.96 within 5σ of 5 %, and neighbouring values uncorrelated; seeds are uncorrelated."""
    draws = torch.stack([stream_values(seed, BLOCK - 5000, 10_000) for seed in range(100)]).double()
    n = draws.numel()
    assert abs(float(draws.mean())) < 5 / math.sqrt(n)
    assert abs(float(draws.var()) - 1.0) < 5 * math.sqrt(2 / n)
    tail = float((draws.abs() > 1.96).double().mean())
    assert abs(tail - 0.05) < 5 * math.sqrt(0.05 * 0.95 / n)
    assert abs(float((draws[:, 1:] * draws[:, :-1]).mean())) < 5 / math.sqrt(n)
    assert abs(float((draws[1:] * draws[:-1]).mean())) < 5 / math.sqrt(n)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("offset", [0, BLOCK - 3])
def test_replay_equals_the_whole_gradient_formula(name, offset):
    """apply_entry, block by block (parameters cut at block edges), equals the optimizer stepping each whole
    parameter with ĝ = Σ_p c_p u_p built from the contract stream."""
    shapes = SHAPES[:9] + [(BLOCK + 3,)]
    params = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    expected = [p.clone() for p in params]
    entries = [LedgerEntry(t, (5 * t, 5 * t + 1, 5 * t + 2), (0.2, -0.1, 0.05), 0.01, 1e-3) for t in (1, 2)]
    ours, theirs = make_client_optimizer(name), make_client_optimizer(name)
    for entry in entries:
        apply_entry(params, ours, entry, offset)
        total = sum(p.numel() for p in expected)
        grad = torch.zeros(total)
        for seed, c in zip(entry.seeds, entry.coefficients()):
            grad.add_(contract_stream(seed, offset, total), alpha=c)
        theirs.begin_step()
        start = 0
        for index, p in enumerate(expected):
            theirs.step_param(index, p, grad[start : start + p.numel()].view(p.shape), entry.lr)
            start += p.numel()
    assert all(torch.equal(a, b) for a, b in zip(params, expected))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_tensors().values(), theirs.state_tensors().values()))


def test_old_contract_ledger_records_are_refused():
    from hosfl_flower.records import ledger_to_record, record_to_ledger

    record = ledger_to_record([LedgerEntry(1, (1, 2), (0.1, 0.2), 0.1, 1e-3)])
    assert record["contract"] == 2
    del record["contract"]
    with pytest.raises(ValueError, match=r"^the ledger record was written under directions contract 1; .* contract 2"):
        record_to_ledger(record)
    record["contract"] = 3
    with pytest.raises(ValueError, match="contract 3"):
        record_to_ledger(record)


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


def test_fingerprint_format_is_stable():
    """Fingerprints are compared across processes, runs and checkpoints: the digest of known tensors is pinned."""
    assert fingerprint([torch.ones(10)]) == "7a0e815abd42ebac3c8a7031e1a59123"
    assert fingerprint([torch.zeros(0), torch.arange(5)]) == "de7def6d821cb63727b0bc747addb6ed"
    assert fingerprint([torch.ones(4, 4).t()]) == fingerprint([torch.ones(4, 4)])
