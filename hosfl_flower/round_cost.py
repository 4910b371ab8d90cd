"""What one round of each protocol costs in work, from the run config: the training examples the
clients process and the optimizer steps the server takes (each protocol's
:meth:`~hosfl_flower.protocols.base.ProtocolServer.planned_cost`).

These are the planned numbers (``hosfl compare --budget-samples`` sizes its runs with them); the
strategies record the measured ones as ``samples`` and ``server-steps`` in ``rounds.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .config import resolve_run_config
from .protocols.base import RunSettings
from .protocols.registry import get_protocol


def _planned(strategy: str, config: Mapping[str, Any]) -> tuple[int, int]:
    resolved = resolve_run_config(config, {"strategy": strategy})
    spec = get_protocol(strategy)
    return spec.server.planned_cost(spec.settings.from_config(resolved), RunSettings.from_config(resolved))


def local_steps(strategy: str, config: Mapping[str, Any]) -> int:
    """Minibatches each sampled client processes in one round."""
    return _planned(strategy, config)[0]


def samples_per_round(strategy: str, config: Mapping[str, Any]) -> int:
    """Training examples processed per round: clients-per-round × batch-size × local steps."""
    return int(config["clients-per-round"]) * int(config["batch-size"]) * local_steps(strategy, config)


def server_steps_per_round(strategy: str, config: Mapping[str, Any]) -> int:
    """Server optimizer steps per round (see each protocol's ``planned_cost``)."""
    return _planned(strategy, config)[1]


def rounds_for_budget(strategy: str, config: Mapping[str, Any], budget_samples: int) -> int:
    """Rounds that process at least ``budget_samples`` training examples: ``ceil(budget / samples per round)``."""
    return math.ceil(budget_samples / samples_per_round(strategy, config))
