"""hosfl-flower: hybrid-order split federated learning (HO-SFL) for the Flower framework.

The public names below are imported lazily, so ``import hosfl_flower.zo`` (the maths) never
imports Flower.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "HOSFLStrategy": "hosfl_flower.flower.strategy",
    "HOSFLClient": "hosfl_flower.node.client",
    "ClientSettings": "hosfl_flower.node.client",
    "register_protocol": "hosfl_flower.protocols",
    "ProtocolServer": "hosfl_flower.protocols",
    "register_model": "hosfl_flower.models",
    "SplitModel": "hosfl_flower.models",
    "build_split_model": "hosfl_flower.models",
    "SplitServer": "hosfl_flower.split_server",
    "ConfigError": "hosfl_flower.config",
    "resolve_run_config": "hosfl_flower.config",
    "server_model_and_test": "hosfl_flower.task",
    "run_reference": "hosfl_flower.reference",
    "build_apps": "hosfl_flower.app",
    "build_client_app": "hosfl_flower.flower.client_app",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hosfl_flower' has no attribute {name!r}")
