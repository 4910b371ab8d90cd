"""What one round of each protocol costs in work, from the run config: the training examples the
clients process and the optimizer steps the server takes.

These are the planned numbers (``hosfl compare --budget-samples`` sizes its runs with them); the
strategies record the measured ones as ``samples`` and ``server-steps`` in ``rounds.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

LOCAL_STEPS_KEY: dict[str, str | None] = {
    "hosfl": None,
    "frozen-client": None,
    "zo-sfl": None,
    "splitfed-v1": "splitfed.local-steps",
    "splitfed-v2": "splitfed.local-steps",
    "heron-sfl": "heron.local-steps",
    "fedavg": "fedavg.local-steps",
}
"""Strategy → the run-config key holding its client minibatches per round (``None``: one)."""


def local_steps(strategy: str, config: Mapping[str, Any]) -> int:
    """Minibatches each sampled client processes in one round."""
    key = LOCAL_STEPS_KEY[strategy]
    return 1 if key is None else int(config[key])


def samples_per_round(strategy: str, config: Mapping[str, Any]) -> int:
    """Training examples processed per round: clients-per-round × batch-size × local steps."""
    return int(config["clients-per-round"]) * int(config["batch-size"]) * local_steps(strategy, config)


def server_steps_per_round(strategy: str, config: Mapping[str, Any]) -> int:
    """Server optimizer steps per round.

    HO-SFL and frozen-client: one step on the round's smashed batches; ZO-SFL: one zeroth-order step
    (none with no directions); SplitFed V2: one per client per local step on the one server model;
    SplitFed V1: one per server copy (one copy per client) per local step; HERON-SFL: one per
    uploaded batch (every ``heron.upload-every``-th of ``heron.local-steps``); FedAvg: none.
    """
    clients = int(config["clients-per-round"])
    if strategy in ("hosfl", "frozen-client"):
        return 1
    if strategy == "zo-sfl":
        return 1 if int(config["zo.num-perturbations"]) > 0 else 0
    if strategy in ("splitfed-v1", "splitfed-v2"):
        return clients * int(config["splitfed.local-steps"])
    if strategy == "heron-sfl":
        return clients * (int(config["heron.local-steps"]) // int(config["heron.upload-every"]))
    if strategy == "fedavg":
        return 0
    raise KeyError(strategy)


def rounds_for_budget(strategy: str, config: Mapping[str, Any], budget_samples: int) -> int:
    """Rounds that process at least ``budget_samples`` training examples: ``ceil(budget / samples per round)``."""
    return math.ceil(budget_samples / samples_per_round(strategy, config))
