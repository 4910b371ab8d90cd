"""Flower strategies: one module per protocol on a shared :class:`SplitStrategy` base."""

from .base import NodeInfo, ReplyError, SplitStrategy
from .fedavg import FedAvgBaseline
from .heron import HeronSFLStrategy
from .hosfl import FrozenClientStrategy, HOSFLStrategy
from .splitfed import SplitFedV1Strategy, SplitFedV2Strategy
from .zo_sfl import ZOSFLStrategy

STRATEGY_CLASSES = {
    "hosfl": HOSFLStrategy,
    "frozen-client": FrozenClientStrategy,
    "zo-sfl": ZOSFLStrategy,
    "splitfed-v1": SplitFedV1Strategy,
    "splitfed-v2": SplitFedV2Strategy,
    "heron-sfl": HeronSFLStrategy,
    "fedavg": FedAvgBaseline,
}
"""Run-config ``strategy`` value → strategy class (each takes ``(model, test, run_config)``)."""

__all__ = [
    "FedAvgBaseline",
    "FrozenClientStrategy",
    "HOSFLStrategy",
    "HeronSFLStrategy",
    "NodeInfo",
    "ReplyError",
    "STRATEGY_CLASSES",
    "SplitFedV1Strategy",
    "SplitFedV2Strategy",
    "SplitStrategy",
    "ZOSFLStrategy",
]
