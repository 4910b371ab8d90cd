"""Flower strategies: one module per protocol on a shared :class:`SplitStrategy` base."""

from .base import NodeInfo, ReplyError, SplitStrategy
from .hosfl import HOSFLStrategy

STRATEGY_CLASSES = {"hosfl": HOSFLStrategy}
"""Run-config ``strategy`` value → strategy class."""

__all__ = ["HOSFLStrategy", "NodeInfo", "ReplyError", "STRATEGY_CLASSES", "SplitStrategy"]
