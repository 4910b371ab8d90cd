"""ZO-SFL (the paper's pure zeroth-order baseline): both segments trained by two-point zeroth-order
steps along shared seeded directions; the client update travels through HO-SFL's ledger.

- ``config.py``: :class:`ZOSFLSettings` (HO-SFL's keys plus ``zo-sfl.lr``)
- ``messages.py``: ``train.zo_smash`` (and HO-SFL's ``query.sync``)
- ``server.py``: :class:`ZOSFLServer` (HO-SFL's ledger sync and checkpoints)
- ``client.py``: the node's handler
"""

from ..registry import register_protocol
from .client import HANDLERS, memory_step
from .config import ZOSFLSettings
from .messages import ZOSmashReply, ZOSmashRequest
from .server import ZOSFLServer

register_protocol(
    "zo-sfl",
    ZOSFLServer,
    ZOSFLSettings,
    HANDLERS,
    "ZO-SFL: zeroth-order steps on both segments along shared directions",
    memory_step=memory_step,
)

__all__ = ["ZOSFLServer", "ZOSFLSettings", "ZOSmashReply", "ZOSmashRequest"]
