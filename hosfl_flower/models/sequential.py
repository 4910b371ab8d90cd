"""Split models made of a list of blocks: the client runs blocks ``0..cut-1``, the server the rest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .base import Inputs, Smashed, SplitModel


class BlockSplitModel(SplitModel):
    """A vision model given as blocks, cut after block ``cut_layer``; input key ``"x"``."""

    def __init__(self, blocks: Sequence[nn.Module], cut_layer: int, num_classes: int) -> None:
        super().__init__()
        if not 1 <= cut_layer < len(blocks):
            raise ValueError(f"cut-layer {cut_layer} is outside this model's 1..{len(blocks) - 1}")
        self.cut_layer = cut_layer
        self.num_classes = num_classes
        self.client = nn.Sequential(*blocks[:cut_layer])
        self.server = nn.Sequential(*blocks[cut_layer:])

    def smash(self, inputs: Inputs) -> Smashed:
        return {"z": self.client(inputs["x"])}

    def head(self, smashed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.server(smashed["z"])
