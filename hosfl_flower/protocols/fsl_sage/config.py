"""FSL-SAGE's settings: the clients' local steps on the auxiliary gradient estimate, and the server's
periodic alignment of the auxiliary model."""

from __future__ import annotations

from dataclasses import dataclass

from ...models.aux_head import AUX_HEADS
from ...options import ConfigError, Settings, setting


@dataclass(frozen=True)
class FSLSageSettings(Settings):
    """How the clients train locally, what they upload, and how the server aligns ``θ_a``
    (docs/protocols.md, "FSL-SAGE")."""

    local_steps: int = setting(
        "fsl-sage.local-steps", 4, "h: local steps per round along the auxiliary model's estimate of λ", minimum=1
    )
    upload_every: int = setting("fsl-sage.upload-every", 2, "k: upload a smashed batch every k local steps", minimum=1)
    lr: float = setting("fsl-sage.lr", 0.3, "SGD learning rate of fsl-sage's client steps", minimum=0.0)
    head: str = setting("fsl-sage.head", "linear", "auxiliary model on the client: linear or mlp", choices=AUX_HEADS)
    align_every: int = setting(
        "fsl-sage.align-every", 10, "l: align the auxiliary model every l rounds (rounds 1, l+1, 2l+1, ...)", minimum=1
    )
    align_epochs: int = setting(
        "fsl-sage.align-epochs", 10, "passes over the stored uploads per alignment (one Adam step per stored batch)", minimum=1
    )
    align_lr: float = setting("fsl-sage.align-lr", 1e-3, "Adam learning rate of the alignment", minimum=0.0)
    buffer_size: int = setting(
        "fsl-sage.buffer-size",
        512,
        "examples of the latest uploads the server keeps for alignment (whole batches, oldest dropped first)",
        minimum=1,
    )

    def check(self) -> None:
        """A round uploads at least one batch: ``fsl-sage.upload-every <= fsl-sage.local-steps``."""
        if self.upload_every > self.local_steps:
            raise ConfigError("fsl-sage.upload-every", self.upload_every, f"must be <= fsl-sage.local-steps ({self.local_steps})")
