"""HERON-SFL: zeroth-order clients trained on an auxiliary head's loss, no server feedback; the server
trains first-order on uploaded smashed batches and averages ``θ_c`` and ``θ_a``.

- ``config.py``: :class:`HeronSettings` (``heron.*``, ``zo.mu``)
- ``messages.py``: ``train.heron``
- ``server.py``: :class:`HeronServer` (the auxiliary head is its checkpoint state)
- ``client.py``: the node's handler (the local zeroth-order loop)
"""

from ..registry import register_protocol
from .client import HANDLERS, memory_step
from .config import HeronSettings
from .messages import HeronReply, HeronRequest, upload_steps
from .server import HeronServer

register_protocol(
    "heron-sfl",
    HeronServer,
    HeronSettings,
    HANDLERS,
    "HERON-SFL: zeroth-order clients on an auxiliary loss, no server feedback",
    memory_step=memory_step,
)

__all__ = ["HeronReply", "HeronRequest", "HeronServer", "HeronSettings", "upload_steps"]
