"""HO-SFL's settings: the zeroth-order client step (directions, estimator, rate, clipping)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ...options import Settings, setting
from ...zo.directions import DISTRIBUTIONS
from ...zo.estimator import ESTIMATORS
from ...zo.optim import CLIENT_OPTIMIZERS
from ...zo.update import LR_SCHEDULES, ClientUpdateRule

MAX_PERTURBATIONS = 10_000
"""Largest ``P`` (each is a scalar per node per round and a seed in every ledger entry)."""


@dataclass(frozen=True)
class HOSFLSettings(Settings):
    """How the clients estimate and take their zeroth-order step (docs/protocols.md, "HO-SFL")."""

    num_perturbations: int = setting(
        "zo.num-perturbations", 20, "P: seeded directions per round (0 freezes the client)", minimum=0, maximum=MAX_PERTURBATIONS
    )
    mu: float = setting(
        "zo.mu", 1e-3, "μ: perturbation scale (below 1e-7 it vanishes in float32 weights)", minimum=1e-7, maximum=1.0
    )
    estimator: str = setting(
        "zo.estimator",
        "forward",
        "forward (the paper's one-sided difference), central, or jvp (exact, forward-mode autodiff)",
        choices=ESTIMATORS,
    )
    directions: str = setting(
        "zo.directions",
        "gaussian",
        "distribution of the seeded directions: gaussian (the paper's) or rademacher (±1)",
        choices=DISTRIBUTIONS,
    )
    clip_grad_norm: float = setting(
        "zo.clip-grad-norm",
        5.0,
        "clip the L2 norm of the aggregated client estimate ĝ to this value before the step (0: off)",
        minimum=0.0,
    )
    max_update_norm: float = setting(
        "zo.max-update-norm",
        1000.0,
        "hard cap on the norm of every ledger entry's estimate ĝ, applied even with zo.clip-grad-norm 0, so that no "
        "node ever replays an unbounded step",
        minimum=0.0,
        exclusive_minimum=True,
    )
    lr_schedule: str = setting(
        "client.lr-schedule",
        "cosine",
        "client learning rate over the rounds: constant, or cosine decay to 0 at num-server-rounds",
        choices=LR_SCHEDULES,
    )
    client_optimizer: str = setting("client.optimizer", "sgd", "client optimizer (sgd is stateless)", choices=CLIENT_OPTIMIZERS)
    client_lr: float = setting("client.lr", 0.3, "client learning rate", minimum=0.0)
    client_weight_decay: float = setting("client.weight-decay", 0.0, "client decoupled weight decay", minimum=0.0)
    final_sync: bool = setting("final-sync", True, "after the last round, bring every node up to date and check its fingerprint")

    def update_rule(self, num_rounds: int) -> ClientUpdateRule:
        """The client update rule of these settings over ``num_rounds`` rounds."""
        return ClientUpdateRule(
            lr=self.client_lr,
            mu=self.mu,
            schedule=self.lr_schedule,
            total_rounds=num_rounds,
            clip_grad_norm=self.clip_grad_norm,
            directions=self.directions,
            max_update_norm=self.max_update_norm,
        )


@dataclass(frozen=True)
class FrozenClientSettings(HOSFLSettings):
    """HO-SFL with ``P = 0``: the ablation whose client segment keeps its initial weights."""

    overrides: ClassVar[Mapping[str, Any]] = {"zo.num-perturbations": 0}
