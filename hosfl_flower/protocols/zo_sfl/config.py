"""ZO-SFL's settings: HO-SFL's (the seeded directions, the client optimizer of the ledger, the final
synchronisation) plus the learning rate of the zeroth-order step both segments take."""

from __future__ import annotations

from dataclasses import dataclass

from ...options import setting
from ..hosfl.config import HOSFLSettings


@dataclass(frozen=True)
class ZOSFLSettings(HOSFLSettings):
    """The step of both segments along the round's shared directions (docs/protocols.md, "ZO-SFL")."""

    lr: float = setting("zo-sfl.lr", 0.05, "learning rate of zo-sfl's zeroth-order steps on both segments", minimum=0.0)
