"""HERON-SFL's messages: ``train.heron`` (``θ_c``, ``θ_a`` and the local-training settings down;
the trained ``θ_c`` and ``θ_a``, the uploaded smashed batches and their steps up: the family's
:class:`~hosfl_flower.protocols.auxiliary.LocalRoundReply`). docs/protocols.md, "HERON-SFL"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from flwr.app import ConfigRecord

from ..auxiliary import LocalRoundReply, LocalRoundRequest, upload_steps
from ..messages import require_number

HeronReply = LocalRoundReply
"""HERON-SFL's reply: the auxiliary family's."""


@dataclass
class HeronRequest(LocalRoundRequest):
    """``train.heron``: the global ``θ_c`` and ``θ_a``, and how to train on them locally (``mu``: the
    zeroth-order perturbation scale)."""

    mu: float = 1e-3

    message_type: ClassVar[str] = "train.heron"
    settings_record: ClassVar[str] = "heron"
    categories: ClassVar = {"arrays": "model_down", "aux-head": "model_down", "heron": "other"}

    def extra_settings(self) -> dict[str, Any]:
        return {"mu": self.mu}

    @classmethod
    def read_extra(cls, settings: ConfigRecord) -> dict[str, Any]:
        return {"mu": require_number(settings, "mu", positive=True)}


__all__ = ["HeronReply", "HeronRequest", "upload_steps"]
