"""A small ResNet for 8×8 digit images (GroupNorm, so no running statistics), cut after a block."""

from __future__ import annotations

import torch
from torch import nn

from .sequential import BlockSplitModel


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (1×1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(4, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(4, out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.GroupNorm(4, out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def digits_resnet_blocks(num_classes: int = 10, width: int = 8) -> list[nn.Module]:
    """Stem, three residual stages (8×8 → 4×4 → 2×2), and a pooled linear head."""
    return [
        nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.GroupNorm(4, width), nn.ReLU()),
        BasicBlock(width, width),
        BasicBlock(width, 2 * width, stride=2),
        BasicBlock(2 * width, 4 * width, stride=2),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes)),
    ]


class SplitResNet(BlockSplitModel):
    """ResNet for ``1×8×8`` images (5 blocks; cut layer in ``1..4``)."""

    num_blocks = 5

    def __init__(self, cut_layer: int = 2, num_classes: int = 10, width: int = 8) -> None:
        super().__init__(digits_resnet_blocks(num_classes, width), cut_layer, num_classes)
