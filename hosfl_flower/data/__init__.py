"""Datasets and their partitioning across nodes with ``flwr-datasets`` partitioners."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import datasets
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from .digits import digits_dataset, digits_examples
from .examples import Examples, sample_batch

datasets.disable_progress_bars()

PARTITIONERS = ("iid", "dirichlet")
DATASETS = ("digits",)
NUM_CLASSES = {"digits": 10}


@dataclass(frozen=True)
class FederatedData:
    """A held-out test split plus a partitioner over the training split."""

    partitioner: Partitioner
    test: Examples
    num_classes: int
    to_examples: object
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_partitions(self) -> int:
        return self.partitioner.num_partitions

    def partition(self, partition_id: int) -> Examples:
        """The training examples of node ``partition_id``."""
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(f"partition-id {partition_id} is outside 0..{self.num_partitions - 1}")
        if partition_id not in self._cache:
            self._cache[partition_id] = self.to_examples(self.partitioner.load_partition(partition_id))
        return self._cache[partition_id]


def make_partitioner(name: str, num_partitions: int, alpha: float, seed: int) -> Partitioner:
    """An ``flwr-datasets`` partitioner by name: ``iid`` or ``dirichlet`` (by label, concentration ``alpha``)."""
    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha, seed=seed, min_partition_size=2
        )
    raise ValueError(f"unknown partitioner {name!r}; allowed: {', '.join(PARTITIONERS)}")


@lru_cache(maxsize=4)
def load_train_test(dataset: str, seed: int, test_fraction: float) -> tuple[Dataset, Examples]:
    """The training split (a ``datasets.Dataset``) and the held-out test examples (cached per process)."""
    if dataset != "digits":
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    split = digits_dataset().train_test_split(test_size=test_fraction, seed=seed)
    return split["train"], digits_examples(split["test"])


@lru_cache(maxsize=8)
def load_federated_data(
    dataset: str, num_partitions: int, partitioner: str, alpha: float, seed: int, test_fraction: float
) -> FederatedData:
    """Load, split and partition a dataset (cached per process: nodes of one run share it)."""
    train, test = load_train_test(dataset, seed, test_fraction)
    part = make_partitioner(partitioner, num_partitions, alpha, seed)
    part.dataset = train
    return FederatedData(part, test, num_classes=NUM_CLASSES[dataset], to_examples=digits_examples)


__all__ = ["DATASETS", "NUM_CLASSES", "Examples", "FederatedData", "PARTITIONERS", "load_federated_data", "load_train_test", "make_partitioner", "sample_batch"]
