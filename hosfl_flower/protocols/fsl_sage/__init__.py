"""FSL-SAGE (Nair et al., ICML 2025): each client's auxiliary model estimates the server's cut-layer
gradient and the client backpropagates that estimate; smashed batches go to the server every ``k``
local steps; every ``l`` rounds the server aligns the auxiliary model to its true cut-layer gradients
on the stored uploads; client segments are averaged by FedAvg.

- ``config.py``: :class:`FSLSageSettings` (``fsl-sage.*``)
- ``messages.py``: ``train.fsl_sage``
- ``server.py``: :class:`FSLSageServer` (the auxiliary model and the stored uploads are its checkpoint state)
- ``client.py``: the node's handler (the local loop along the estimated gradient)
"""

from ..registry import register_protocol
from .client import HANDLERS, memory_step
from .config import FSLSageSettings
from .messages import FSLSageReply, FSLSageRequest
from .server import FSLSageServer

register_protocol(
    "fsl-sage",
    FSLSageServer,
    FSLSageSettings,
    HANDLERS,
    "FSL-SAGE: first-order clients along an auxiliary estimate of λ, aligned by the server every l rounds",
    memory_step=memory_step,
)

__all__ = ["FSLSageReply", "FSLSageRequest", "FSLSageServer", "FSLSageSettings"]
