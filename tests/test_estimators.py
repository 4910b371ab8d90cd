"""Estimator variants (forward, central, jvp) and Rademacher directions: maths and replay (their Flower runs: below)."""

import math

import pytest
import torch
from flwr.app import RecordDict
from torch import nn

from hosfl_flower.config import ConfigError, all_options, resolve_run_config
from hosfl_flower.flower.strategy import HOSFLStrategy
from hosfl_flower.models import build_split_model
from hosfl_flower.protocols.hosfl import client as handlers
from hosfl_flower.protocols.hosfl.messages import ProbeRequest
from hosfl_flower.protocols.hosfl.sync import ledger_from_rows
from hosfl_flower.records import ledger_to_record, record_to_ledger
from hosfl_flower.task import server_model_and_test
from hosfl_flower.zo import (
    DISTRIBUTIONS,
    ESTIMATORS,
    STREAM_BLOCK,
    LedgerEntry,
    SeedDirection,
    apply_entry,
    check_jvp,
    fingerprint,
    make_client_optimizer,
    mix_seed,
    perturb_,
    probe_scalars,
    replay,
    seed_direction,
    stream_values,
    trainable_parameters,
)

from .test_client import make_client, smash


def smooth_client(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)


def conv_client():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 4, 3, padding=1))


def backprop_directional(module, forward, lam, seed, distribution="gaussian"):
    """``⟨J_cᵀ λ, u⟩`` with autograd: the exact directional derivative the estimators approximate."""
    params = trainable_parameters(module)
    grads = torch.autograd.grad(forward(), params, grad_outputs=lam)
    return sum(
        float((g.double() * u.double()).sum()) for g, u in zip(grads, seed_direction(params, seed, distribution=distribution))
    )


def test_estimator_names_agree_with_the_run_config():
    options = all_options()
    assert options["zo.estimator"].choices == ESTIMATORS and options["zo.directions"].choices == DISTRIBUTIONS


# --------------------------------------------------------------------------- jvp
def test_jvp_is_the_limit_of_the_forward_difference():
    """v/μ of the forward difference tends to the jvp value, its error shrinking about linearly in μ (float64)."""
    model = smooth_client()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam = torch.randn(8, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seeds = [3, 4, 5]
    exact = [v / 1.0 for v in probe_scalars("jvp", lambda: model(x), model, lam, seeds, 1.0)]
    with torch.no_grad():
        z = model(x)
    errors = []
    for mu in (1e-2, 1e-3, 1e-4):
        jvp = probe_scalars("jvp", lambda: model(x), model, lam, seeds, mu)
        assert all(math.isclose(a / mu, b, rel_tol=1e-12) for a, b in zip(jvp, exact)), "jvp is μ·⟨λ, J u⟩"
        forward = probe_scalars("forward", lambda: model(x), model, lam, seeds, mu, anchor=z)
        errors.append(max(abs(a / mu - b) / abs(b) for a, b in zip(forward, exact)))
    # within 1 % at μ = 1e-4 (0.23 %, 2.3 %, 23 % over μ = 1e-4 … 1e-2 for these seeds)
    assert errors[-1] < 1e-2 and all(0.05 < later / earlier < 0.2 for earlier, later in zip(errors, errors[1:])), errors


def test_jvp_equals_the_backprop_directional_derivative_and_leaves_no_trace():
    """Float32 conv segment: μ⟨λ, J u⟩ equals ⟨Jᵀλ, u⟩ from autograd to ~1e-5; no graph, parameters untouched."""
    model = conv_client()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lam = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(2))
    before = [p.detach().clone() for p in model.parameters()]
    outputs = []
    model[2].register_forward_hook(lambda module, args, out: outputs.append(out))
    mu = 1e-3
    for distribution in DISTRIBUTIONS:
        outputs.clear()
        scalars = probe_scalars("jvp", lambda: model(x), model, lam, [7, 8], mu, distribution=distribution)
        assert len(outputs) == 2 and all(o.grad_fn is None for o in outputs), "the jvp probe recorded a graph"
        for seed, v in zip([7, 8], scalars):
            expected = backprop_directional(model, lambda: model(x), lam, seed, distribution)
            assert math.isclose(v / mu, expected, rel_tol=1e-5), (distribution, v / mu, expected)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(
    "name", ["tiny-gpt2", "tiny-opt", "tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma", "tiny-bert", "tiny-roberta"]
)
def test_jvp_runs_through_the_hugging_face_split_models_with_lora(name):
    """Forward-mode AD through each family's client segment (attention on the math kernel), against autograd."""
    from hosfl_flower.models.hf import LoraSettings, build_hf_split_model

    from .test_hf_split import padded_batch

    model = build_hf_split_model(name, 1, "classification", 3, seed=1, lora=LoraSettings(rank=2, alpha=4.0))
    with torch.no_grad():  # LoRA's B starts at zero: randomise it so every adapter has a derivative
        for i, param in enumerate(trainable_parameters(model.client)):
            param.copy_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(i)))
    inputs = padded_batch()
    forward = lambda: model.smash(inputs)["z"]  # noqa: E731
    with torch.no_grad():
        lam = torch.randn(forward().shape, generator=torch.Generator().manual_seed(3))
    check_jvp(forward, model.client)
    (v,) = probe_scalars("jvp", forward, model.client, lam, [11], 1.0)
    expected = backprop_directional(model.client, forward, lam, 11)
    assert v != 0.0 and math.isclose(v, expected, rel_tol=1e-4), (v, expected)


class _NoForwardAD(torch.autograd.Function):
    """An operation with a backward but no forward-mode derivative."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_a_model_without_forward_mode_derivatives_fails_at_setup_with_one_line():
    config = resolve_run_config({"zo.estimator": "jvp", "results-dir": ""})
    model, test = server_model_and_test(config)
    HOSFLStrategy(model, test, config)  # the CNN supports it
    smash = model.smash
    model.smash = lambda inputs: {"z": _NoForwardAD.apply(smash(inputs)["z"])}
    with pytest.raises(ConfigError) as error:
        HOSFLStrategy(model, test, config)
    text = str(error.value)
    assert "zo.estimator='jvp'" in text and "cannot be used with this model" in text and "\n" not in text
    HOSFLStrategy(model, test, {**config, "zo.estimator": "central"})  # only jvp needs the derivatives


# --------------------------------------------------------------------------- central
class Quadratic(nn.Module):
    """``z = x (WᵀW) + a ⊙ a``: every output is a quadratic polynomial of the parameters."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64))
        self.a = nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))

    def forward(self, x):
        return x @ (self.w.T @ self.w) + self.a * self.a


def test_central_difference_is_exact_for_a_quadratic_segment_and_forward_is_not():
    module = Quadratic()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lam = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seeds = [1, 2, 3]
    exact = [backprop_directional(module, lambda: module(x), lam, s) for s in seeds]
    with torch.no_grad():
        z = module(x)
    forward_errors = []
    for mu in (1e-2, 1e-1, 1.0, 3.0):
        central = probe_scalars("central", lambda: module(x), module, lam, seeds, mu)
        assert all(math.isclose(v / mu, e, rel_tol=1e-11) for v, e in zip(central, exact)), (mu, central, exact)
        forward = probe_scalars("forward", lambda: module(x), module, lam, seeds, mu, anchor=z)
        forward_errors.append(max(abs(v / mu - e) / abs(e) for v, e in zip(forward, exact)))
    # the forward difference is off by μ·uᵀHu/2: its relative error grows in proportion to μ
    assert forward_errors[0] > 1e-4
    assert all(5 < later / earlier < 20 for earlier, later in zip(forward_errors[:2], forward_errors[1:3]))


@pytest.mark.parametrize("estimator", ["forward", "central"])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_kept_directions_equal_redrawn_ones(monkeypatch, estimator, distribution):
    """The small-segment fast path (directions drawn once per probe) gives the same bits as redrawing them."""
    import hosfl_flower.zo.directions as module

    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    runs = []
    for keep in (True, False):
        if not keep:  # a segment spread over several blocks redraws its direction at every move
            monkeypatch.setattr(SeedDirection, "__init__", _redrawing_init(module))
        model = conv_client()
        with torch.no_grad():
            z = model(x)
        scalars = probe_scalars(
            estimator, lambda: model(x), model, torch.ones_like(z), [4, 5, 6], 1e-2, anchor=z, distribution=distribution
        )
        runs.append((scalars, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(runs[0][1], conv_client().parameters()))


def _redrawing_init(module):
    original = module.SeedDirection.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        assert self.kept is not None, "the conv client fits one block: it keeps its directions"
        self.kept = None

    return init


def test_probe_scalars_rejects_unknown_names_and_a_missing_anchor():
    model = smooth_client()
    x = torch.zeros(2, 6, dtype=torch.float64)
    lam = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown estimator 'backward'"):
        probe_scalars("backward", lambda: model(x), model, lam, [1], 1e-3)
    with pytest.raises(ValueError, match="needs the anchor"):
        probe_scalars("forward", lambda: model(x), model, lam, [1], 1e-3)
    with pytest.raises(ValueError, match="unknown direction distribution 'uniform'"):
        probe_scalars("central", lambda: model(x), model, lam, [1], 1e-3, distribution="uniform")
    with pytest.raises(ValueError, match="unknown direction distribution"):
        LedgerEntry(1, (1,), (0.0,), 0.1, 1e-3, "uniform")


# --------------------------------------------------------------------------- Rademacher directions
SHAPES = [(1,), (7,), (16,), (3, 5), (16, 1, 3, 3), (300, 301), ((1 << 16) + 3,)]


def contract_rademacher(seed, start, count):
    """The contract, spelled out: block k of the stream is randint(0, 2) from a fresh CPU generator seeded with
    mix_seed(2, seed, k), as ±1; values start .. start + count − 1 of the blocks laid end to end."""
    first, last = start // STREAM_BLOCK, (start + count - 1) // STREAM_BLOCK
    blocks = []
    for block in range(first, last + 1):
        generator = torch.Generator().manual_seed(mix_seed(2, seed, block))
        blocks.append(torch.randint(0, 2, (STREAM_BLOCK,), generator=generator, dtype=torch.float32) * 2 - 1)
    at = start - first * STREAM_BLOCK
    return torch.cat(blocks)[at : at + count]


def test_rademacher_entries_are_signs_with_equal_probability():
    """Every entry is exactly ±1. Over 10⁶ entries (200 seeds × 5,000) the mean is within 5σ = 0.005 of 0
    and the share of +1 within 5σ = 0.0025 of 1/2; per position, over the 200 seeds, |mean| < 5/√200;
    neighbouring entries are uncorrelated (|lag-1 mean product| < 0.005)."""
    draws = torch.stack([stream_values(seed, 0, 5000, "rademacher") for seed in range(200)])
    assert torch.equal(draws.abs(), torch.ones_like(draws))
    assert abs(float(draws.mean())) < 0.005
    assert abs(float((draws > 0).double().mean()) - 0.5) < 0.0025
    assert float(draws.mean(dim=0).abs().max()) < 5 / math.sqrt(200)
    assert abs(float((draws[:, 1:] * draws[:, :-1]).mean())) < 0.005


@pytest.mark.parametrize("offset", [0, 3, STREAM_BLOCK - 5])
def test_rademacher_directions_follow_the_contract_on_every_path(offset):
    """The stream, owned directions, the perturbation and a float64 parameter all give the contract's bits."""
    total = sum(math.prod(s) for s in SHAPES)
    for seed in (0, 9, 2**62 + 1):
        expected = contract_rademacher(seed, offset, total)
        assert torch.equal(stream_values(seed, offset, total, "rademacher"), expected)
        assert torch.equal(stream_values(seed, offset, total, "rademacher"), expected), "same seed, same bits"
        assert not torch.equal(stream_values(seed + 1, offset, total, "rademacher"), expected)
        like = [torch.empty(s) for s in SHAPES]
        drawn = torch.cat([u.reshape(-1) for u in seed_direction(like, seed, offset, "rademacher")])
        assert torch.equal(drawn, expected)
        params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
        perturb_(params, seed, 0.5, offset, distribution="rademacher")
        assert torch.equal(torch.cat([p.reshape(-1) for p in params]), 0.5 * expected.double())
    # the gaussian stream is untouched by the argument
    assert torch.equal(stream_values(5, 1, 9), stream_values(5, 1, 9, "gaussian"))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_replay_of_a_rademacher_ledger_is_bit_identical(name):
    """Entries carry their distribution: a node that applies them one by one, and one that replays them (after a
    round trip through the ledger record), end with the same bits; the same entries as gaussian differ."""
    entries = [LedgerEntry(t, (t * 5, t * 5 + 1), (0.3 / t, -0.2), 0.05, 1e-3, "rademacher") for t in range(1, 7)]
    a, b, c = smooth_client(torch.float32), smooth_client(torch.float32), smooth_client(torch.float32)
    opt_a = make_client_optimizer(name)
    for entry in entries:
        apply_entry(trainable_parameters(a), opt_a, entry)
    received = record_to_ledger(ledger_to_record(entries))
    assert received == entries
    replay(trainable_parameters(b), make_client_optimizer(name), received)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    gaussian = [LedgerEntry(e.round, e.seeds, e.scalars, e.lr, e.mu) for e in entries]
    replay(trainable_parameters(c), make_client_optimizer(name), gaussian)
    assert fingerprint(trainable_parameters(c)) != fingerprint(trainable_parameters(a))


def test_ledger_records_and_checkpoint_rows_keep_the_distribution():
    gaussian = [LedgerEntry(1, (1, 2), (0.1, 0.2), 0.1, 1e-3)]
    mixed = [*gaussian, LedgerEntry(2, (3,), (0.3,), 0.1, 1e-3, "rademacher")]
    assert "directions" not in ledger_to_record(gaussian)  # gaussian ledgers keep their size on the wire
    assert record_to_ledger(ledger_to_record(gaussian)) == gaussian
    assert record_to_ledger(ledger_to_record(mixed)) == mixed
    rows = [(1, [1, 2], [0.1, 0.2], 0.1, 1e-3), (2, [3], [0.3], 0.1, 1e-3, "rademacher")]  # an old row, a new one
    assert list(ledger_from_rows(rows)) == mixed


# --------------------------------------------------------------------------- the client's probe
@pytest.mark.parametrize("estimator,distribution", [("central", "rademacher"), ("jvp", "gaussian"), ("jvp", "rademacher")])
def test_client_probe_uses_the_estimator_and_directions_it_is_sent(estimator, distribution):
    entry = LedgerEntry(1, (21, 22), (0.01, -0.02), 1e-3, 1e-3, distribution)
    state = RecordDict()
    client = make_client(state)
    result = smash(client, 2, [entry], from_round=0)
    lam = torch.randn(result.batch.smashed["z"].shape, generator=torch.Generator().manual_seed(0)) / 100
    request = ProbeRequest(lam, (5, 6, 7), 1e-3, estimator, distribution)
    scalars = handlers.probe(make_client(state), request, 2).scalars

    replica = build_split_model("cnn", 2, 10, seed=0)
    apply_entry(replica.client_parameters(), make_client_optimizer("adamw"), entry)
    inputs = client.draw_batch(2).inputs
    expected = probe_scalars(
        estimator, lambda: replica.smash(inputs)["z"], replica.client, lam, [5, 6, 7], 1e-3, distribution=distribution
    )
    assert scalars == expected
    other = "gaussian" if distribution == "rademacher" else "rademacher"
    assert (
        probe_scalars(estimator, lambda: replica.smash(inputs)["z"], replica.client, lam, [5, 6, 7], 1e-3, distribution=other)
        != expected
    )


# --------------------------------------------------------------------------- Flower runs against the reference loop
# Each estimator variant's Flower run equals the reference loop bit for bit in a Flower run it shares: the central
# difference with Rademacher directions in test_simulation.py's run
# (test_flower_run_with_the_central_estimator_and_rademacher_directions_is_bit_identical), the jvp estimator, with
# the split server in its own Ray actor and an AdamW client, in test_flwr_run.py's HO-SFL run
# (test_flower_run_with_an_estimator_variant_is_bit_identical_to_the_reference).
