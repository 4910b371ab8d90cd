"""The documented extension points do what they say: a strategy's aggregation weights (also when
replies are dropped), a model family registered from outside the package, and the registry's
refusals of inconsistent registrations."""

import pytest

from hosfl_flower.models import MODEL_FAMILIES, SplitCNN, register_model
from hosfl_flower.options import Settings
from hosfl_flower.protocols import ServerHooks, register_protocol
from hosfl_flower.protocols.hosfl.client import HANDLERS
from hosfl_flower.protocols.hosfl.config import HOSFLSettings
from hosfl_flower.protocols.hosfl.messages import ProbeRequest
from hosfl_flower.protocols.hosfl.server import HOSFLServer
from hosfl_flower.reference import InProcessLink, run_reference
from hosfl_flower.zo import aggregate_scalars

WEIGHTS = [0.6, 0.3, 0.1]


class FixedWeights(ServerHooks):
    """Weights that are not shares of examples (every batch has 32)."""

    def aggregation_weights(self, server_round, num_examples):
        return WEIGHTS[: len(num_examples)]


class DropFirstProbe(InProcessLink):
    """Loses the first node's probe reply (and records what the others sent)."""

    kept_scalars: list = []

    def exchange(self, requests, check=None):
        if requests and isinstance(requests[0][1], ProbeRequest):
            replies = super().exchange(requests[1:], check)
            DropFirstProbe.kept_scalars.append([r.scalars for r in replies.values()])
            return replies
        return super().exchange(requests, check)


def test_dropped_probe_replies_are_rescaled_by_the_kept_weights(monkeypatch):
    """v̄ = (Σ_all w / Σ_kept w) Σ_kept v: with weights that are not shares of examples, rescaling by the
    kept examples (as a strategy once did) gives another entry."""
    import hosfl_flower.reference as reference

    monkeypatch.setattr(reference, "InProcessLink", DropFirstProbe)
    DropFirstProbe.kept_scalars = []
    config = {"num-server-rounds": 1, "zo.clip-grad-norm": 0.0, "zo.num-perturbations": 4}
    result = run_reference(config, 4, hooks=FixedWeights())
    (entry,) = list(result.ledger)
    (kept,) = DropFirstProbe.kept_scalars
    assert len(kept) == 2 and result.history[0]["probe-replies"] == 2
    assert entry.scalars == aggregate_scalars(kept, WEIGHTS[1] + WEIGHTS[2], sum(WEIGHTS))
    by_examples = aggregate_scalars(kept, 2 * 32, 3 * 32)
    assert all(abs(a - b) > 1e-9 for a, b in zip(entry.scalars, by_examples))


def test_a_model_family_registered_outside_the_package_runs():
    if "cnn-narrow" not in MODEL_FAMILIES:
        register_model("cnn-narrow", lambda cut_layer, num_classes: SplitCNN(cut_layer, num_classes, width=4), 4, 2, ("digits",))
    narrow = run_reference({"model": "cnn-narrow", "num-server-rounds": 2, "eval-every": 2}, 4)
    default = run_reference({"num-server-rounds": 1}, 4)
    assert sum(p.numel() for p in narrow.model.client_parameters()) < sum(p.numel() for p in default.model.client_parameters())
    assert len(narrow.model.client) == 2 and len(narrow.ledger) == 2
    from hosfl_flower.config import ConfigError, resolve_run_config

    with pytest.raises(ConfigError, match="cut-layer=5"):
        resolve_run_config({"model": "cnn-narrow", "cut-layer": 5})
    with pytest.raises(ConfigError, match="dataset='sentiment'"):
        resolve_run_config({"model": "cnn-narrow", "dataset": "sentiment"})
    with pytest.raises(ValueError, match="already registered"):
        register_model("cnn", lambda cut_layer, num_classes: SplitCNN(cut_layer), 4, 2)


def test_registrations_that_would_be_ambiguous_are_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_protocol("hosfl", HOSFLServer, HOSFLSettings, HANDLERS)

    from dataclasses import dataclass

    from hosfl_flower.options import setting

    @dataclass(frozen=True)
    class Clashing(Settings):
        mu: float = setting("zo.mu", 0.5, "a different default for an existing key")

    with pytest.raises(ValueError, match="zo.mu"):
        register_protocol("clashing", HOSFLServer, Clashing, HANDLERS)
