"""CSE-FSL's settings: the clients' local first-order training on the auxiliary loss."""

from __future__ import annotations

from dataclasses import dataclass

from ...models.aux_head import AUX_HEADS
from ...options import ConfigError, Settings, setting


@dataclass(frozen=True)
class CSEFSLSettings(Settings):
    """How the clients train locally and what they upload (docs/protocols.md, "CSE-FSL")."""

    local_steps: int = setting("cse-fsl.local-steps", 4, "h: first-order local steps per round on the auxiliary loss", minimum=1)
    upload_every: int = setting("cse-fsl.upload-every", 2, "k: upload a smashed batch every k local steps", minimum=1)
    lr: float = setting("cse-fsl.lr", 0.3, "SGD learning rate of cse-fsl's client steps (segment and head)", minimum=0.0)
    head: str = setting("cse-fsl.head", "linear", "auxiliary head on the client: linear or mlp", choices=AUX_HEADS)

    def check(self) -> None:
        """A round uploads at least one batch: ``cse-fsl.upload-every <= cse-fsl.local-steps``."""
        if self.upload_every > self.local_steps:
            raise ConfigError("cse-fsl.upload-every", self.upload_every, f"must be <= cse-fsl.local-steps ({self.local_steps})")
