"""Central evaluation of a split model on held-out examples."""

from __future__ import annotations

import torch

from .data import Examples
from .models import SplitModel


@torch.no_grad()
def evaluate_model(model: SplitModel, examples: Examples, batch_size: int = 512) -> tuple[float, float]:
    """Mean loss and accuracy (:meth:`SplitModel.count_correct`) of the unsplit forward pass over ``examples``."""
    was_training = model.training
    model.eval()
    total_loss, correct, counted = 0.0, 0, 0
    for batch in examples.batches(batch_size):
        logits = model(batch.inputs)
        total_loss += float(model.loss(logits, batch.labels)) * len(batch)
        right, seen = model.count_correct(logits, batch.labels)
        correct, counted = correct + right, counted + seen
    model.train(was_training)
    return total_loss / max(len(examples), 1), correct / max(counted, 1)
