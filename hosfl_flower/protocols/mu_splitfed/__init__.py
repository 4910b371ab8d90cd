"""MU-SplitFed, as the HO-SFL authors reimplemented it for their comparison: zeroth-order steps on both
sides (the clients along one seeded direction shared by the round's nodes, ``τ`` server steps per
client step on per-client server replicas) and FedAvg-style mixing of client segments and replicas.

- ``config.py``: :class:`MUSplitFedSettings` (``mu-splitfed.*``)
- ``messages.py``: ``train.mu_smash``, ``train.mu_step``
- ``server.py``: :class:`MUSplitFedServer`
- ``client.py``: the node's handlers
"""

from ..registry import register_protocol
from .client import HANDLERS, memory_step
from .config import MUSplitFedSettings
from .messages import MUSmashReply, MUSmashRequest, MUStepReply, MUStepRequest
from .server import MUSplitFedServer

register_protocol(
    "mu-splitfed",
    MUSplitFedServer,
    MUSplitFedSettings,
    HANDLERS,
    "MU-SplitFed: zeroth-order clients and server replicas, τ server steps per client step",
    memory_step=memory_step,
)

__all__ = ["MUSmashReply", "MUSmashRequest", "MUSplitFedServer", "MUSplitFedSettings", "MUStepReply", "MUStepRequest"]
