"""Datasets and their partitioning across nodes with ``flwr-datasets`` partitioners.

``digits`` (scikit-learn's bundled images) and ``sentiment`` (a generated text task) need no
download; any other name is loaded with ``datasets.load_dataset`` and tokenised with the model's
Hugging Face tokenizer (for real users where the hub or local files are reachable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import TYPE_CHECKING

from .examples import Examples, sample_batch

if TYPE_CHECKING:  # imported lazily: each deployment ClientApp process pays for its imports
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner

PARTITIONERS = ("iid", "dirichlet")


@dataclass(frozen=True)
class TextSpec:
    """How text data is tokenised and labelled (ignored for ``digits``)."""

    task: str = "classification"
    max_length: int = 24
    tokenizer: str = ""
    text_column: str = "text"
    label_column: str = "label"
    template: str = "{text}"
    label_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the data: classes, verbalizer token ids, and the converter to tensors."""

    num_classes: int
    to_examples: Callable[[Dataset], Examples]
    verbalizer_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class FederatedData:
    """A held-out test split plus a partitioner over the training split."""

    partitioner: Partitioner
    test: Examples
    info: DataInfo
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_partitions(self) -> int:
        return self.partitioner.num_partitions

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def partition(self, partition_id: int) -> Examples:
        """The training examples of node ``partition_id`` (cached)."""
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(f"partition-id {partition_id} is outside 0..{self.num_partitions - 1}")
        if partition_id not in self._cache:
            self._cache[partition_id] = self.info.to_examples(self.partitioner.load_partition(partition_id))
        return self._cache[partition_id]


def make_partitioner(name: str, num_partitions: int, alpha: float, seed: int) -> Partitioner:
    """An ``flwr-datasets`` partitioner by name: ``iid`` or ``dirichlet`` (by label, concentration ``alpha``)."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha, seed=seed, min_partition_size=2
        )
    raise ValueError(f"unknown partitioner {name!r}; allowed: {', '.join(PARTITIONERS)}")


@lru_cache(maxsize=4)
def load_train_test(
    dataset: str, seed: int, test_fraction: float, text: TextSpec | None = None
) -> tuple[Dataset, Examples, DataInfo]:
    """The training split (a ``datasets.Dataset``), the held-out test examples and :class:`DataInfo` (cached)."""
    import datasets

    datasets.disable_progress_bars()
    if dataset == "digits":
        from .digits import digits_dataset, digits_examples

        split = digits_dataset().train_test_split(test_size=test_fraction, seed=seed)
        return split["train"], digits_examples(split["test"]), DataInfo(10, digits_examples)
    from .text import load_text_task, sentiment_task, text_examples

    text = text or TextSpec()
    if dataset == "sentiment":
        task = sentiment_task(seed=seed, max_length=text.max_length)
    else:
        task = load_text_task(
            dataset,
            text.tokenizer,
            text.max_length,
            text_column=text.text_column,
            label_column=text.label_column,
            template=text.template,
            label_words=text.label_words,
        )
    verbalizer = task.verbalizer_ids if text.task == "verbalizer" else None
    info = DataInfo(task.num_classes, partial(text_examples, task=text.task), verbalizer)
    split = task.dataset.train_test_split(test_size=test_fraction, seed=seed)
    return split["train"], info.to_examples(split["test"]), info


@lru_cache(maxsize=8)
def load_federated_data(
    dataset: str,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    seed: int,
    test_fraction: float,
    text: TextSpec | None = None,
) -> FederatedData:
    """Load, split and partition a dataset (cached per process: nodes of one run share it)."""
    train, test, info = load_train_test(dataset, seed, test_fraction, text)
    part = make_partitioner(partitioner, num_partitions, alpha, seed)
    part.dataset = train
    return FederatedData(part, test, info)


__all__ = [
    "DataInfo",
    "Examples",
    "FederatedData",
    "PARTITIONERS",
    "TextSpec",
    "load_federated_data",
    "load_train_test",
    "make_partitioner",
    "sample_batch",
]
