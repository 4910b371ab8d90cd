"""SplitFed V1 and V2 (Thapa et al.): first-order split learning with FedAvg of the client segments.

- ``config.py``: :class:`SplitFedSettings` (``splitfed.*``)
- ``messages.py``: ``train.splitfed_smash``, ``train.splitfed_grad``
- ``server.py``: :class:`SplitFedV2Server`, :class:`SplitFedV1Server`
- ``client.py``: the node's handlers and the first-order client step
"""

from ..registry import register_protocol
from .client import HANDLERS, memory_step
from .config import SplitFedSettings
from .server import SplitFedV1Server, SplitFedV2Server

register_protocol(
    "splitfed-v2",
    SplitFedV2Server,
    SplitFedSettings,
    HANDLERS,
    "SplitFed V2: first-order clients, one server model stepped on the clients in sequence",
    memory_step=memory_step,
)
register_protocol(
    "splitfed-v1",
    SplitFedV1Server,
    SplitFedSettings,
    HANDLERS,
    "SplitFed V1: first-order clients, one server copy per client averaged each round",
    memory_step=memory_step,
)

__all__ = ["SplitFedSettings", "SplitFedV1Server", "SplitFedV2Server"]
