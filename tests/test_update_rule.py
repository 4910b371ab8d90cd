"""The client update rule: gradient-norm clipping and the learning-rate schedule (no Flower)."""

import math

import pytest
import torch

from hosfl_flower.zo import SGD, ClientUpdateRule, LedgerEntry, apply_entry, estimate_gradient, estimate_norm


def _params():
    torch.manual_seed(0)
    return [torch.randn(7, 5), torch.randn(11)]


def _norm(tensors):
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def test_estimate_norm_is_the_norm_of_the_estimate():
    params = _params()
    entry = LedgerEntry(1, (11, 12, 13), (0.3, -0.2, 0.05), 0.1, 1e-3)
    expected = _norm(estimate_gradient(params, entry.seeds, entry.scalars, entry.mu))
    assert estimate_norm(params, entry) == pytest.approx(expected, rel=1e-12)


def test_clipping_scales_the_scalars_to_the_clip_norm_and_leaves_small_estimates_alone():
    params = _params()
    seeds, scalars = (3, 4, 5, 6), (0.02, -0.01, 0.03, 0.005)
    unclipped = estimate_norm(params, LedgerEntry(1, seeds, scalars, 0.1, 1e-3))
    clip = unclipped / 4
    entry = ClientUpdateRule(lr=0.1, mu=1e-3, clip_grad_norm=clip).entry(1, seeds, scalars, params)
    assert estimate_norm(params, entry) == pytest.approx(clip, rel=1e-9)
    assert all(v / s == pytest.approx(0.25, rel=1e-12) for v, s in zip(entry.scalars, scalars))
    loose = ClientUpdateRule(lr=0.1, mu=1e-3, clip_grad_norm=unclipped * 2).entry(1, seeds, scalars, params)
    assert loose.scalars == scalars
    off = ClientUpdateRule(lr=0.1, mu=1e-3).entry(1, seeds, scalars, params)
    assert off.scalars == scalars


def test_a_clipped_update_moves_theta_by_at_most_lr_times_the_clip():
    params = _params()
    before = [p.clone() for p in params]
    rule = ClientUpdateRule(lr=0.5, mu=1e-3, clip_grad_norm=0.1)
    apply_entry(params, SGD(), rule.entry(1, (1, 2), (5.0, -3.0), params))
    assert _norm([p - b for p, b in zip(params, before)]) == pytest.approx(0.5 * 0.1, rel=1e-5)


def test_the_entry_does_not_change_the_parameters_it_measures():
    params = _params()
    before = [p.clone() for p in params]
    ClientUpdateRule(lr=0.1, mu=1e-3, clip_grad_norm=1e-6).entry(1, (1, 2), (1.0, 1.0), params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_cosine_schedule_decays_from_lr_to_zero_over_the_run():
    rule = ClientUpdateRule(lr=0.2, mu=1e-3, schedule="cosine", total_rounds=100)
    rates = [rule.lr_at(t) for t in range(1, 101)]
    assert rates[0] == 0.2 and rates[50] == pytest.approx(0.1) and 0 < rates[-1] < 1e-3
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert ClientUpdateRule(lr=0.2, mu=1e-3).lr_at(77) == 0.2
    entry = rule.entry(51, (1,), (0.1,), _params())
    assert entry.lr == pytest.approx(0.1)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown client lr schedule 'linear'"):
        ClientUpdateRule(lr=0.1, mu=1e-3, schedule="linear")
