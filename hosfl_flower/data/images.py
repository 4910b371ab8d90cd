"""Image classification data: decoded images to the model's input tensors.

The model-dependent part is an :class:`ImageSpec` (square size, channels, per-channel mean and
std); :func:`image_tensor` converts each image to the spec's mode (``L`` or ``RGB``), resizes it
(bilinear) to the spec's square size, scales it to [0, 1] and normalises it. Examples have inputs
``{"x": float32 (n, C, H, W)}`` and integer labels ``(n,)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .examples import Examples

if TYPE_CHECKING:
    from datasets import Dataset

DECODE_BATCH = 256
"""Images decoded and transformed at a time."""


@dataclass(frozen=True)
class ImageSpec:
    """The images a model takes: ``image_size`` × ``image_size`` pixels with ``num_channels`` (1: ``L``,
    3: ``RGB``), scaled to [0, 1] then normalised per channel as ``(x - mean) / std``."""

    image_size: int
    num_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(value) for value in self.mean))
        object.__setattr__(self, "std", tuple(float(value) for value in self.std))
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 (L) or 3 (RGB), got {self.num_channels}")
        if len(self.mean) != self.num_channels or len(self.std) != self.num_channels:
            raise ValueError(f"mean {self.mean} and std {self.std} need one value per channel ({self.num_channels})")
        if not all(math.isfinite(value) for value in self.mean) or not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError(f"mean {self.mean} must be finite and std {self.std} finite and > 0")

    @property
    def mode(self) -> str:
        """The PIL mode images are converted to."""
        return "L" if self.num_channels == 1 else "RGB"


def image_tensor(images: Iterable[Any], spec: ImageSpec) -> torch.Tensor:
    """Decoded (PIL) images as ``float32 (n, C, H, W)`` in the spec's mode, size and normalisation."""
    from PIL import Image

    side = spec.image_size
    arrays = []
    for image in images:
        if image.mode != spec.mode:
            image = image.convert(spec.mode)
        if image.size != (side, side):
            image = image.resize((side, side), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.uint8).reshape(side, side, spec.num_channels))
    pixels = np.stack(arrays) if arrays else np.zeros((0, side, side, spec.num_channels), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def decodable(dataset: Dataset, column: str) -> Dataset:
    """``dataset`` with ``column`` a decoding ``datasets.Image`` feature (paths or bytes are cast)."""
    from datasets import Image

    feature = dataset.features[column]
    if isinstance(feature, Image) and feature.decode:
        return dataset
    return dataset.cast_column(column, Image())


def image_examples(dataset: Dataset, image_column: str, label_column: str, spec: ImageSpec) -> Examples:
    """The examples of ``dataset``: images decoded and transformed by :func:`image_tensor`, integer labels."""
    table = dataset.select_columns([image_column, label_column]).with_format(None)
    chunks = [image_tensor(batch[image_column], spec) for batch in table.iter(batch_size=DECODE_BATCH)]
    x = torch.cat(chunks) if chunks else image_tensor([], spec)
    labels = torch.from_numpy(np.asarray(table[label_column], dtype=np.int64).reshape(-1))
    return Examples({"x": x}, labels)


__all__ = ["ImageSpec", "decodable", "image_examples", "image_tensor"]
