"""Split models and the registry that builds them from the run config."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import Inputs, Smashed, SplitModel
from .cnn import SplitCNN
from .resnet import SplitResNet
from .sequential import BlockSplitModel

MODEL_BUILDERS: dict[str, Callable[..., SplitModel]] = {
    "cnn": lambda cut_layer, num_classes: SplitCNN(cut_layer=cut_layer, num_classes=num_classes),
    "resnet": lambda cut_layer, num_classes: SplitResNet(cut_layer=cut_layer, num_classes=num_classes),
}
"""Named model constructors: ``builder(cut_layer=..., num_classes=...) -> SplitModel``."""


def build_split_model(
    name: str,
    cut_layer: int,
    num_classes: int,
    seed: int,
    task: str = "classification",
    lora=None,
    verbalizer_ids=None,
) -> SplitModel:
    """Build a split model with initial weights determined by ``seed`` alone (every node builds the same).

    ``name`` is a vision model of :data:`MODEL_BUILDERS`, or else a Hugging Face model (a ``tiny-*``
    configuration, a hub name or a local directory) split by :mod:`hosfl_flower.models.hf`, with
    ``task``, optional ``lora`` (:class:`~hosfl_flower.models.hf.LoraSettings`) and ``verbalizer_ids``.
    """
    if name in MODEL_BUILDERS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MODEL_BUILDERS[name](cut_layer=cut_layer, num_classes=num_classes)
        return model.eval()
    from .hf import build_hf_split_model  # transformers is imported only for transformer runs

    return build_hf_split_model(name, cut_layer, task, num_classes, seed, lora, verbalizer_ids)


__all__ = [
    "BlockSplitModel", "Inputs", "MODEL_BUILDERS", "Smashed", "SplitCNN", "SplitModel", "SplitResNet", "build_split_model",
]
