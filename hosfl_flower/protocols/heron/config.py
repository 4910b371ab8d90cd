"""HERON-SFL's settings: the clients' local zeroth-order training on the auxiliary loss."""

from __future__ import annotations

from dataclasses import dataclass

from ...models.aux_head import AUX_HEADS
from ...options import ConfigError, Settings, setting


@dataclass(frozen=True)
class HeronSettings(Settings):
    """How the clients train locally and what they upload (docs/protocols.md, "HERON-SFL")."""

    local_steps: int = setting("heron.local-steps", 4, "h: zeroth-order local steps per round on the auxiliary loss", minimum=1)
    upload_every: int = setting("heron.upload-every", 2, "k: upload a smashed batch every k local steps", minimum=1)
    lr: float = setting("heron.lr", 0.003, "learning rate of heron-sfl's client steps", minimum=0.0)
    head: str = setting("heron.head", "linear", "auxiliary head on the client: linear or mlp", choices=AUX_HEADS)
    mu: float = setting(
        "zo.mu", 1e-3, "μ: perturbation scale (below 1e-7 it vanishes in float32 weights)", minimum=1e-7, maximum=1.0
    )

    def check(self) -> None:
        """A round uploads at least one batch: ``heron.upload-every <= heron.local-steps``."""
        if self.upload_every > self.local_steps:
            raise ConfigError("heron.upload-every", self.upload_every, f"must be <= heron.local-steps ({self.local_steps})")
