"""HERON-SFL's server part (docs/protocols.md, "HERON-SFL"): one exchange per round, no server feedback.

Round ``t``: ``train.heron`` carries ``θ_c`` and the auxiliary head ``θ_a`` to the sampled nodes; each
takes ``h`` zeroth-order steps on its own auxiliary loss and uploads the smashed batch of every
``k``-th step. The server then trains ``θ_s`` first-order on those batches, node by node (SplitFed-V2
order), and averages ``θ_c`` and ``θ_a`` weighted by the nodes' numbers of examples (the family's
round, :class:`~hosfl_flower.protocols.auxiliary.AuxiliaryServer`).
"""

from __future__ import annotations

from ..auxiliary import AuxiliaryServer
from .config import HeronSettings
from .messages import HeronRequest


class HeronServer(AuxiliaryServer):
    """HERON-SFL; ``self.aux_head`` is the global auxiliary head ``θ_a`` (built from ``spec.z_example``)."""

    name = "heron-sfl"
    settings: HeronSettings

    def request(self, server_round: int) -> HeronRequest:
        """``train.heron`` with the global ``θ_c``, ``θ_a`` and the zeroth-order local-training settings."""
        s = self.settings
        return HeronRequest(self.client_state(), self.head_state(), s.local_steps, s.upload_every, s.lr, s.head, mu=s.mu)
