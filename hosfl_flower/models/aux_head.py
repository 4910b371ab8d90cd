"""HERON-SFL's auxiliary head: a small classifier on the cut activation, trained on the client."""

from __future__ import annotations

import torch
from torch import nn

AUX_HEADS = ("linear", "mlp")


class AuxHead(nn.Module):
    """Flatten ``z`` (for ``(B, T, H)`` activations: the mean over the tokens the attention mask keeps),
    then a linear layer or a small MLP."""

    def __init__(self, kind: str, in_features: int, num_classes: int, pool_tokens: bool = False) -> None:
        super().__init__()
        if kind not in AUX_HEADS:
            raise ValueError(f"unknown auxiliary head {kind!r}; allowed: {', '.join(AUX_HEADS)}")
        self.pool_tokens = pool_tokens
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_features, num_classes)
        else:
            self.net = nn.Sequential(nn.Linear(in_features, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, z: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        if not self.pool_tokens:
            return self.net(z.flatten(1))
        if attention_mask is None:
            return self.net(z.mean(dim=1))
        weights = attention_mask.to(z.dtype).unsqueeze(-1)
        return self.net((z * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0))


def build_aux_head(kind: str, smashed_example: torch.Tensor, num_classes: int, seed: int) -> AuxHead:
    """An auxiliary head for activations shaped like ``smashed_example`` (one batch), seeded by ``seed``."""
    pool_tokens = smashed_example.dim() == 3
    in_features = smashed_example.shape[-1] if pool_tokens else int(smashed_example[0].numel())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AuxHead(kind, in_features, num_classes, pool_tokens)
    return head
