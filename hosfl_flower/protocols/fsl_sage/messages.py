"""FSL-SAGE's messages: ``train.fsl_sage`` (``θ_c``, the aligned ``θ_a`` and the local-training
settings down; the trained ``θ_c`` and the uploaded smashed batches up, no ``θ_a``: the node does not
train it). docs/protocols.md, "FSL-SAGE"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..auxiliary import LocalRoundReply, LocalRoundRequest


@dataclass
class FSLSageRequest(LocalRoundRequest):
    """``train.fsl_sage``: the global ``θ_c`` and the server's ``θ_a``; ``h`` steps of ``θ_c`` along
    ``J_cᵀ ∂ℓ(a(z), y)/∂z``, the auxiliary model's estimate of the server's ``λ``."""

    message_type: ClassVar[str] = "train.fsl_sage"
    settings_record: ClassVar[str] = "fsl-sage"
    returns_head: ClassVar[bool] = False
    categories: ClassVar = {"arrays": "model_down", "aux-head": "model_down", "fsl-sage": "other"}


FSLSageReply = LocalRoundReply
"""FSL-SAGE's reply: the auxiliary family's, without ``aux-head``."""
