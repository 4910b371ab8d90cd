"""SplitFed's settings: the steps of a round and the clients' first-order learning rate."""

from __future__ import annotations

from dataclasses import dataclass

from ...options import Settings, setting


@dataclass(frozen=True)
class SplitFedSettings(Settings):
    """SplitFed V1 and V2 (docs/protocols.md, "SplitFed")."""

    local_steps: int = setting(
        "splitfed.local-steps", 1, "E: SplitFed steps per round (each: activations up, gradient down)", minimum=1
    )
    lr: float = setting("splitfed.lr", 0.05, "SGD learning rate of SplitFed's client segment", minimum=0.0)
