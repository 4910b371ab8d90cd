"""CSE-FSL's messages: ``train.cse_fsl`` (``θ_c``, ``θ_a`` and the local-training settings down; the
family's :class:`~hosfl_flower.protocols.auxiliary.LocalRoundReply` up). docs/protocols.md, "CSE-FSL"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..auxiliary import LocalRoundReply, LocalRoundRequest


@dataclass
class CSEFSLRequest(LocalRoundRequest):
    """``train.cse_fsl``: the global ``θ_c`` and ``θ_a``; ``h`` first-order steps on the auxiliary loss."""

    message_type: ClassVar[str] = "train.cse_fsl"
    settings_record: ClassVar[str] = "cse-fsl"
    categories: ClassVar = {"arrays": "model_down", "aux-head": "model_down", "cse-fsl": "other"}


CSEFSLReply = LocalRoundReply
"""CSE-FSL's reply: the auxiliary family's."""
