"""Split models and the registry of model families the run config's ``model`` can name.

``register_model`` adds a family (a builder of a :class:`SplitModel` from ``cut_layer`` and
``num_classes``); anything else is a Hugging Face model (a ``tiny-*`` configuration, a
``pretrained-*`` checkpoint the package builds, a hub name or a local directory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import Inputs, Smashed, SplitModel
from .cnn import SplitCNN
from .resnet import SplitResNet
from .sequential import BlockSplitModel


@dataclass(frozen=True)
class ModelFamily:
    """A named family of split models."""

    name: str
    build: Callable[..., SplitModel]
    """``build(cut_layer=..., num_classes=...) -> SplitModel`` (weights drawn from torch's global RNG)."""
    num_blocks: int
    """The run config's ``cut-layer`` may be 1 .. ``num_blocks``."""
    default_cut: int
    """What ``cut-layer=0`` means for this family."""
    datasets: tuple[str, ...] | None = None
    """The ``dataset`` values it can take (``None``: any)."""
    tasks: tuple[str, ...] = ("classification",)


MODEL_FAMILIES: dict[str, ModelFamily] = {}
"""Registered model families by name."""


def register_model(
    name: str,
    build: Callable[..., SplitModel],
    num_blocks: int,
    default_cut: int,
    datasets: tuple[str, ...] | None = None,
    tasks: tuple[str, ...] = ("classification",),
) -> ModelFamily:
    """Make ``name`` a ``model`` value of the run config (``ValueError`` if it is taken or inconsistent)."""
    if name in MODEL_FAMILIES or name.startswith(("tiny-", "pretrained-")):
        raise ValueError(f"model name {name!r} is already registered or reserved")
    if not 1 <= default_cut <= num_blocks:
        raise ValueError(f"default_cut {default_cut} must be within 1..{num_blocks}")
    family = ModelFamily(name, build, num_blocks, default_cut, datasets, tasks)
    MODEL_FAMILIES[name] = family
    return family


# The CNN is cut after its third block by default: with two blocks on the client a frozen random
# client segment is within 0.03 of a trained one on the digits, so a comparison would say nothing
# about client training (docs/tuning.md).
register_model("cnn", lambda cut_layer, num_classes: SplitCNN(cut_layer=cut_layer, num_classes=num_classes), 4, 3, ("digits",))
register_model(
    "resnet", lambda cut_layer, num_classes: SplitResNet(cut_layer=cut_layer, num_classes=num_classes), 4, 2, ("digits",)
)


def build_split_model(
    name: str,
    cut_layer: int,
    num_classes: int,
    seed: int,
    task: str = "classification",
    lora=None,
    verbalizer_ids=None,
    client_batchnorm: str = "frozen",
    vocab_size: int | None = None,
) -> SplitModel:
    """Build a split model with initial weights determined by ``seed`` alone (every node builds the same).

    ``name`` is a registered family (:data:`MODEL_FAMILIES`), or else a Hugging Face model (a ``tiny-*``
    configuration, a hub name or a local directory): an image classifier (ResNet, ViT) split by
    :mod:`hosfl_flower.models.hf.vision` with ``client_batchnorm``, or a transformer split by
    :mod:`hosfl_flower.models.hf` with ``task``, optional ``lora``
    (:class:`~hosfl_flower.models.hf.LoraSettings`), ``verbalizer_ids`` and, for a ``tiny-*``
    configuration, ``vocab_size``.
    """
    if name in MODEL_FAMILIES:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MODEL_FAMILIES[name].build(cut_layer=cut_layer, num_classes=num_classes)
        return model.eval()
    # transformers is imported only for Hugging Face runs
    from .hf.vision import build_vision_split_model, is_vision_model

    if is_vision_model(name):
        if task != "classification":
            raise ValueError(f"task {task!r} is not available for the image classifier {name}; allowed: classification")
        return build_vision_split_model(name, cut_layer, num_classes, seed, lora, client_batchnorm)
    from .hf import build_hf_split_model

    return build_hf_split_model(name, cut_layer, task, num_classes, seed, lora, verbalizer_ids, vocab_size=vocab_size)


__all__ = [
    "BlockSplitModel",
    "Inputs",
    "MODEL_FAMILIES",
    "ModelFamily",
    "Smashed",
    "SplitCNN",
    "SplitModel",
    "SplitResNet",
    "build_split_model",
    "register_model",
]
