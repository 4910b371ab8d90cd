"""scikit-learn's bundled 8×8 digit images (1 797 examples, no download) as a ``datasets.Dataset``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from datasets import Dataset

from .examples import Examples


def digits_dataset() -> Dataset:
    """The digits images as a Hugging Face ``Dataset`` with columns ``image`` (64 floats in [0, 1]) and ``label``."""
    from datasets import Dataset
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.data / 16.0).astype(np.float32)
    return Dataset.from_dict({"image": images.tolist(), "label": bunch.target.astype(np.int64).tolist()})


def digits_examples(dataset: Dataset) -> Examples:
    """Tensors for the CNN: ``x`` of shape ``(n, 1, 8, 8)`` and integer labels."""
    table = dataset.with_format("numpy")
    images = np.asarray(table["image"], dtype=np.float32).reshape(-1, 1, 8, 8)
    labels = np.asarray(table["label"], dtype=np.int64)
    return Examples({"x": torch.from_numpy(images)}, torch.from_numpy(labels))
