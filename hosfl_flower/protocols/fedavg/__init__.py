"""FedAvg (McMahan et al.) of the unsplit model, as a protocol: the nodes train the whole model with
first-order steps (:meth:`HOSFLClient.fit`) and the server averages it.

- ``config.py``: :class:`FedAvgSettings` (``fedavg.*``)
- ``messages.py``: ``train.fedavg``
- ``server.py``: :class:`FedAvgServer`
- ``client.py``: the node's handler
"""

from ..registry import register_protocol
from .client import HANDLERS, memory_step
from .config import FedAvgSettings
from .server import FedAvgServer

register_protocol(
    "fedavg",
    FedAvgServer,
    FedAvgSettings,
    HANDLERS,
    "FedAvg: the whole model trained first-order on the clients",
    memory_step=memory_step,
)

__all__ = ["FedAvgServer", "FedAvgSettings"]
