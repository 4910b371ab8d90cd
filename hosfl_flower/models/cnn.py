"""A small CNN for 8×8 digit images, cut after a configurable block."""

from __future__ import annotations

from torch import nn

from .sequential import BlockSplitModel


def digits_cnn_blocks(num_classes: int = 10, width: int = 8) -> list[nn.Module]:
    """The CNN as a list of blocks; cutting after block ``c`` puts blocks ``0..c-1`` on the client."""
    return [
        nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU()),  # 8 x 8
        nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),  # 4 x 4
        nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),  # 2 x 2
        nn.Sequential(nn.Flatten(), nn.Linear(16 * width, 64), nn.ReLU()),
        nn.Linear(64, num_classes),
    ]


class SplitCNN(BlockSplitModel):
    """CNN for ``1×8×8`` images (5 blocks; cut layer in ``1..4``)."""

    num_blocks = 5

    def __init__(self, cut_layer: int = 2, num_classes: int = 10, width: int = 8) -> None:
        super().__init__(digits_cnn_blocks(num_classes, width), cut_layer, num_classes)
