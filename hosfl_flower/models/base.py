"""The split-model abstraction every protocol works with."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..zo.directions import trainable_names, trainable_parameters

TASKS = ("classification", "causal-lm", "verbalizer")
"""What a split model can be trained for (vision families: classification only)."""

Inputs = Mapping[str, torch.Tensor]
"""A batch of model inputs by name (``{"x": images}``, or ``input_ids`` and ``attention_mask``)."""

Smashed = dict[str, torch.Tensor]
"""What crosses the cut: ``"z"`` (the smashed activation) plus any companions the server half needs."""


class SplitModel(nn.Module, ABC):
    """A model cut at a layer into a ``client`` segment and a ``server`` segment.

    ``smash`` runs the client segment and returns ``{"z": ..., <companions>}``; ``head`` runs the
    server segment on that dictionary and returns logits. ``z`` is the only tensor that receives an
    activation gradient; companions (masks, positions) travel with it and are accounted as bytes.
    Trainable sets are the ``requires_grad`` parameters of each segment, in ``named_parameters()`` order.
    """

    client: nn.Module
    server: nn.Module
    num_classes: int

    @abstractmethod
    def smash(self, inputs: Inputs) -> Smashed:
        """Client segment: inputs to the smashed activation and its companions."""

    @abstractmethod
    def head(self, smashed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Server segment: smashed activation to logits."""

    def forward(self, inputs: Inputs) -> torch.Tensor:  # noqa: D102 - the unsplit model
        return self.head(self.smash(inputs))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch (cross-entropy by default)."""
        return F.cross_entropy(logits, labels)

    def count_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        """``(correct, counted)`` predictions of a batch (argmax of each example's logits)."""
        return int((logits.argmax(dim=-1) == labels).sum()), int(labels.shape[0])

    def client_parameters(self) -> list[nn.Parameter]:
        """``θ_c``: the client segment's trainable parameters (what zeroth-order steps perturb)."""
        return trainable_parameters(self.client)

    def server_parameters(self) -> list[nn.Parameter]:
        """``θ_s``: the server segment's trainable parameters."""
        return trainable_parameters(self.server)

    def client_state(self) -> dict[str, torch.Tensor]:
        """Trainable client tensors by name (detached views, not copies)."""
        return {n: p.detach() for n, p in zip(trainable_names(self.client), self.client_parameters())}

    @torch.no_grad()
    def load_client_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy trainable client tensors in place; the names must match exactly."""
        names = trainable_names(self.client)
        if sorted(state) != sorted(names):
            missing = sorted(set(names) - set(state))
            extra = sorted(set(state) - set(names))
            raise ValueError(f"client state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, param in zip(names, self.client_parameters()):
            value = state[name]
            if value.shape != param.shape:
                raise ValueError(f"client state {name!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.copy_(value)
