"""CSE-FSL's server part (Mu & Shen; docs/protocols.md, "CSE-FSL"): one exchange per round, no
gradient to the clients.

Round ``t``: ``train.cse_fsl`` carries ``θ_c`` and the auxiliary head ``θ_a`` to the sampled nodes;
each takes ``h`` first-order SGD steps on its own auxiliary loss ``ℓ(h_a(f_c(x)), y)`` and uploads the
smashed batch of steps ``k−1, 2k−1, …``. The one server model ``θ_s`` takes a first-order step on each
upload, node by node in request order once the round's replies are in (as if they had arrived in that
order: the order, and so the bits, do not depend on the transport), and ``θ_c`` and ``θ_a`` are averaged
by FedAvg.
"""

from __future__ import annotations

from ..auxiliary import AuxiliaryServer
from .config import CSEFSLSettings
from .messages import CSEFSLRequest


class CSEFSLServer(AuxiliaryServer):
    """CSE-FSL; ``self.aux_head`` is the global auxiliary head ``θ_a``."""

    name = "cse-fsl"
    settings: CSEFSLSettings

    def request(self, server_round: int) -> CSEFSLRequest:
        """``train.cse_fsl`` with the global ``θ_c``, ``θ_a`` and the local-training settings."""
        s = self.settings
        return CSEFSLRequest(self.client_state(), self.head_state(), s.local_steps, s.upload_every, s.lr, s.head)
