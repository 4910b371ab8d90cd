"""Tensors of examples, and the deterministic minibatch draw every protocol uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..zo.directions import mix_seed


@dataclass(frozen=True)
class Examples:
    """A set of examples: named input tensors (first dimension = example) and integer labels."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, indices: torch.Tensor) -> Examples:
        """The examples at ``indices``."""
        return Examples({k: v[indices] for k, v in self.inputs.items()}, self.labels[indices])

    def batches(self, batch_size: int):
        """Consecutive batches in order (for evaluation)."""
        for start in range(0, len(self), batch_size):
            index = torch.arange(start, min(start + batch_size, len(self)))
            yield self.take(index)


def sample_batch(examples: Examples, batch_size: int, *seed_parts: int) -> Examples:
    """A minibatch drawn without replacement by a generator seeded from ``seed_parts``.

    Every party that knows the run seed, the partition and the round draws the same batch.
    """
    if len(examples) == 0:
        raise ValueError("cannot draw a minibatch from an empty partition")
    generator = torch.Generator().manual_seed(mix_seed(*seed_parts))
    order = torch.randperm(len(examples), generator=generator)
    return examples.take(order[: min(batch_size, len(examples))])
