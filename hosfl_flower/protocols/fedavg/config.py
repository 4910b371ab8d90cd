"""FedAvg's settings: the local first-order steps of the whole model."""

from __future__ import annotations

from dataclasses import dataclass

from ...options import Settings, setting


@dataclass(frozen=True)
class FedAvgSettings(Settings):
    """FedAvg of the unsplit model (docs/protocols.md, "FedAvg")."""

    local_steps: int = setting("fedavg.local-steps", 5, "first-order local steps of the whole model per FedAvg round", minimum=1)
    lr: float = setting("fedavg.lr", 0.3, "SGD learning rate of FedAvg's local steps", minimum=0.0)
