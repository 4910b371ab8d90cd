"""HO-SFL (arXiv 2603.14773): zeroth-order clients guided by the server's ``λ``, a first-order
server, dimension-free aggregation; and its frozen-client ablation (``P = 0``).

- ``config.py``: :class:`HOSFLSettings` (``zo.*``, ``client.*``, ``final-sync``)
- ``messages.py``: ``train.smash``, ``train.probe``, ``query.sync``
- ``server.py``: :class:`HOSFLServer` (``sync.py``: the ledger and each node's version)
- ``client.py``: the node's handlers
"""

from ..registry import register_protocol
from .client import HANDLERS, memory_step
from .config import FrozenClientSettings, HOSFLSettings
from .server import FrozenClientServer, HOSFLServer

register_protocol(
    "hosfl", HOSFLServer, HOSFLSettings, HANDLERS, "HO-SFL: zeroth-order clients, first-order server", memory_step=memory_step
)
register_protocol(
    "frozen-client", FrozenClientServer, FrozenClientSettings, HANDLERS, "ablation: HO-SFL with P = 0 (the client never trains)"
)

__all__ = ["FrozenClientServer", "FrozenClientSettings", "HOSFLServer", "HOSFLSettings"]
