"""Zeroth-order engine: seeded directions, estimators, client optimizers and the ledger.

This package has no Flower imports; the Flower layer and the in-process reference loop both use it.
"""

from .directions import (
    DISTRIBUTIONS,
    check_distribution,
    direction,
    draw_directions_,
    fingerprint,
    mix_seed,
    perturb_,
    trainable_names,
    trainable_parameters,
    transient_direction,
)
from .estimator import (
    ESTIMATORS,
    aggregate_scalars,
    central_probe_scalars,
    check_jvp,
    dot64,
    estimate_gradient,
    hybrid_probe_scalars,
    jvp_probe_scalars,
    needs_anchor,
    probe_scalars,
)
from .ledger import Ledger, LedgerEntry, apply_entry, replay, zo_gradient
from .optim import CLIENT_OPTIMIZERS, SGD, AdamW, ClientOptimizer, make_client_optimizer
from .update import LR_SCHEDULES, ClientUpdateRule, cap_entry, estimate_norm

__all__ = [
    "AdamW",
    "CLIENT_OPTIMIZERS",
    "DISTRIBUTIONS",
    "ESTIMATORS",
    "ClientUpdateRule",
    "cap_entry",
    "LR_SCHEDULES",
    "ClientOptimizer",
    "Ledger",
    "LedgerEntry",
    "SGD",
    "aggregate_scalars",
    "apply_entry",
    "central_probe_scalars",
    "check_distribution",
    "check_jvp",
    "direction",
    "dot64",
    "draw_directions_",
    "estimate_gradient",
    "estimate_norm",
    "fingerprint",
    "hybrid_probe_scalars",
    "jvp_probe_scalars",
    "make_client_optimizer",
    "mix_seed",
    "needs_anchor",
    "perturb_",
    "probe_scalars",
    "replay",
    "trainable_names",
    "trainable_parameters",
    "transient_direction",
    "zo_gradient",
]
