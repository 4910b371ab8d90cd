"""A small CNN for 8×8 digit images, cut after a configurable block."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .base import Inputs, Smashed, SplitModel


def digits_cnn_blocks(num_classes: int = 10, width: int = 8) -> list[nn.Module]:
    """The CNN as a list of blocks; cutting after block ``c`` puts blocks ``0..c-1`` on the client."""
    return [
        nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU()),  # 8 x 8
        nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),  # 4 x 4
        nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),  # 2 x 2
        nn.Sequential(nn.Flatten(), nn.Linear(16 * width, 64), nn.ReLU()),
        nn.Linear(64, num_classes),
    ]


class SplitCNN(SplitModel):
    """CNN for ``1×8×8`` images; input key ``"x"``; cut layer in ``1..num_blocks-1``."""

    num_blocks = 5

    def __init__(self, cut_layer: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        if not 1 <= cut_layer < self.num_blocks:
            raise ValueError(f"cut-layer {cut_layer} is outside the CNN's 1..{self.num_blocks - 1}")
        blocks = digits_cnn_blocks(num_classes, width)
        self.cut_layer = cut_layer
        self.num_classes = num_classes
        self.client = nn.Sequential(*blocks[:cut_layer])
        self.server = nn.Sequential(*blocks[cut_layer:])

    def smash(self, inputs: Inputs) -> Smashed:
        return {"z": self.client(inputs["x"])}

    def head(self, smashed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.server(smashed["z"])
