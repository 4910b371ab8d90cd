"""CSE-FSL (Mu & Shen): first-order clients trained on an auxiliary head's loss, smashed batches
uploaded every ``k`` local steps and no gradient back; one server model trained on the uploads;
``θ_c`` and ``θ_a`` averaged by FedAvg.

- ``config.py``: :class:`CSEFSLSettings` (``cse-fsl.*``)
- ``messages.py``: ``train.cse_fsl``
- ``server.py``: :class:`CSEFSLServer` (the auxiliary head is its checkpoint state)
- ``client.py``: the node's handler (the local first-order loop)
"""

from ..registry import register_protocol
from .client import HANDLERS, memory_step
from .config import CSEFSLSettings
from .messages import CSEFSLReply, CSEFSLRequest
from .server import CSEFSLServer

register_protocol(
    "cse-fsl",
    CSEFSLServer,
    CSEFSLSettings,
    HANDLERS,
    "CSE-FSL: first-order clients on an auxiliary loss, periodic uploads, no server gradient",
    memory_step=memory_step,
)

__all__ = ["CSEFSLReply", "CSEFSLRequest", "CSEFSLServer", "CSEFSLSettings"]
