"""Zeroth-order engine: seeded directions, estimators, client optimizers and the ledger.

This package has no Flower imports; the Flower layer and the in-process reference loop both use it.
"""

from .directions import (
    direction,
    draw_directions_,
    fingerprint,
    mix_seed,
    perturb_,
    trainable_names,
    trainable_parameters,
    transient_direction,
)
from .estimator import aggregate_scalars, dot64, estimate_gradient, hybrid_probe_scalars
from .ledger import Ledger, LedgerEntry, apply_entry, replay, zo_gradient
from .optim import CLIENT_OPTIMIZERS, AdamW, ClientOptimizer, SGD, make_client_optimizer

__all__ = [
    "AdamW",
    "CLIENT_OPTIMIZERS",
    "ClientOptimizer",
    "Ledger",
    "LedgerEntry",
    "SGD",
    "aggregate_scalars",
    "apply_entry",
    "direction",
    "dot64",
    "draw_directions_",
    "estimate_gradient",
    "fingerprint",
    "hybrid_probe_scalars",
    "make_client_optimizer",
    "mix_seed",
    "perturb_",
    "replay",
    "trainable_names",
    "trainable_parameters",
    "transient_direction",
    "zo_gradient",
]
