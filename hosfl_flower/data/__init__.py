"""Datasets, their evaluation split, and their partitioning across nodes with ``flwr-datasets`` partitioners.

``digits`` (scikit-learn's bundled images) and ``sentiment`` (a generated text task) need no
download and are evaluated on a held-out share of their examples. Any other name is a Hugging Face
hub dataset (``datasets.load_dataset``) or a local directory or file (:mod:`.sources`): a dataset
with an image column becomes image examples through an :class:`ImageSpec` (:mod:`.images`), any
other a text task tokenised with a Hugging Face tokenizer (:mod:`.text`). Such datasets are
evaluated on their own ``validation`` (else ``test``) split unless ``DataOptions.eval_split`` says
otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any

from . import tensor_cache
from .digits import digits_examples
from .examples import Examples, sample_batch
from .images import ImageSpec
from .partitioners import PARTITION_OPTIONS, PARTITIONERS, PartitionSpec, make_partitioner
from .sources import BUNDLED, HELD_OUT, check_bundled_eval_split

if TYPE_CHECKING:  # imported lazily: each deployment ClientApp process pays for its imports
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner


@dataclass(frozen=True)
class TextSpec:
    """How text data is tokenised (ignored for ``digits`` and image datasets).

    ``tokenizer``: a Hugging Face name or directory; for ``sentiment`` empty means its own word-level tokenizer.
    """

    task: str = "classification"
    max_length: int = 24
    tokenizer: str = ""
    text_column: str = "text"
    template: str = "{text}"
    label_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataOptions:
    """Where a hub or local dataset's evaluation examples and columns are (empty: found automatically)."""

    subset: str = ""
    """The hub dataset's configuration (e.g. ``rte`` of ``nyu-mll/glue``)."""
    eval_split: str = ""
    """Empty: ``validation``, else ``test``, else held out; ``held-out``: a ``test_fraction`` of the training split."""
    label_column: str = ""
    image_column: str = ""


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the data: classes, verbalizer token ids, and the converter to tensors."""

    num_classes: int
    to_examples: Callable[[Dataset], Examples]
    verbalizer_ids: tuple[int, ...] | None = None
    vocab_size: int | None = None
    """The tokenizer's vocabulary size, special tokens included (text data only)."""
    label_column: str = "label"
    """The column of the training split that holds the labels (what label-based partitioners split by)."""


@dataclass(frozen=True)
class FederatedData:
    """A held-out test split plus the training split's partitions: drawn by a partitioner on first use,
    or all given as tensors (:meth:`from_partitions`)."""

    partitioner: Partitioner | None
    test: Examples
    info: DataInfo
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_partitions(cls, partitions: list[Examples], test: Examples, info: DataInfo) -> FederatedData:
        """Data whose every partition is already tensors (no partitioner)."""
        return cls(None, test, info, dict(enumerate(partitions)))

    @property
    def num_partitions(self) -> int:
        return self.partitioner.num_partitions if self.partitioner is not None else len(self._cache)

    def partition_size(self, partition_id: int) -> int:
        """The number of examples of partition ``partition_id`` (without converting it to tensors)."""
        if partition_id in self._cache or self.partitioner is None:
            return len(self.partition(partition_id))
        return len(self.partitioner.load_partition(partition_id))

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def partition(self, partition_id: int) -> Examples:
        """The training examples of node ``partition_id`` (cached)."""
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(f"partition-id {partition_id} is outside 0..{self.num_partitions - 1}")
        if partition_id not in self._cache:
            assert self.partitioner is not None  # data built from tensors holds every partition
            self._cache[partition_id] = self.info.to_examples(self.partitioner.load_partition(partition_id))
        return self._cache[partition_id]


def is_image_dataset(dataset: str, options: DataOptions = DataOptions()) -> bool:
    """Whether ``dataset``'s training split has an image column (loads a hub or local dataset, cached)."""
    if dataset in BUNDLED:
        return False
    from .sources import choose_splits, find_image_column, load_splits

    train, _, _ = choose_splits(dataset, load_splits(dataset, options.subset), HELD_OUT)
    return find_image_column(train, options.image_column) is not None


DIGITS_INFO = DataInfo(10, digits_examples)
"""The bundled digits: ten classes, images as ``x`` of shape ``(n, 1, 8, 8)``."""


def _digits() -> tuple[Dataset, None, DataInfo]:
    from .digits import digits_dataset

    return digits_dataset(), None, DIGITS_INFO


def _sentiment(seed: int, text: TextSpec) -> tuple[Dataset, None, DataInfo]:
    from .text import sentiment_task, text_examples

    task = sentiment_task(seed=seed, max_length=text.max_length, tokenizer=text.tokenizer or None)
    verbalizer = task.verbalizer_ids if text.task == "verbalizer" else None
    return task.dataset, None, DataInfo(task.num_classes, partial(text_examples, task=text.task), verbalizer, task.vocab_size)


def _images(
    name: str,
    train: Dataset,
    evaluation: Dataset | None,
    split: str,
    image_column: str,
    image: ImageSpec | None,
    options: DataOptions,
) -> tuple[Dataset, Dataset | None, DataInfo]:
    from ..options import ConfigError
    from .images import decodable, image_examples
    from .sources import check_eval_labels, count_classes, find_label_column

    if image is None:
        raise ValueError(f"dataset {name!r} holds images (column {image_column!r}): loading it needs an ImageSpec")
    label_column = find_label_column(train, options.label_column, exclude=(image_column,))
    num_classes = count_classes(train, label_column)
    train = decodable(train, image_column)
    if evaluation is not None:
        if image_column not in evaluation.column_names:
            raise ConfigError("data.eval-split", split, f"has no image column {image_column!r}")
        check_eval_labels(evaluation, split, label_column, num_classes)
        evaluation = decodable(evaluation, image_column)
    to_examples = partial(image_examples, image_column=image_column, label_column=label_column, spec=image)
    return train, evaluation, DataInfo(num_classes, to_examples, label_column=label_column)


def _text(
    train: Dataset, evaluation: Dataset | None, split: str, text: TextSpec, options: DataOptions
) -> tuple[Dataset, Dataset | None, DataInfo]:
    from .sources import check_eval_labels, find_label_column
    from .text import template_fields, text_examples, text_task, tokenize_dataset

    if not text.tokenizer:
        raise ValueError("a Hugging Face text dataset needs a tokenizer (TextSpec.tokenizer)")
    label_column = find_label_column(train, options.label_column)
    used = {label_column, text.text_column, *template_fields(text.template), "input_ids", "attention_mask", "label"}
    kept = [column for column in train.column_names if column not in used]  # for partitioners such as natural-id
    task = text_task(
        train, text.tokenizer, text.max_length, text.text_column, label_column, text.template, text.label_words, kept
    )
    if evaluation is not None:
        check_eval_labels(evaluation, split, label_column, task.num_classes)
        evaluation = tokenize_dataset(evaluation, task.tokenizer, text.max_length, text.text_column, label_column, text.template)
    verbalizer = task.verbalizer_ids if text.task == "verbalizer" else None
    info = DataInfo(task.num_classes, partial(text_examples, task=text.task), verbalizer, task.vocab_size)
    return task.dataset, evaluation, info


def load_train_test(
    dataset: str,
    seed: int,
    test_fraction: float,
    text: TextSpec | None = None,
    *,
    image: ImageSpec | None = None,
    options: DataOptions = DataOptions(),
) -> tuple[Dataset, Examples, DataInfo]:
    """The training split (a ``datasets.Dataset``), the evaluation examples and :class:`DataInfo` (cached per process).

    The evaluation examples are the dataset's evaluation split (``options.eval_split``), or a
    ``test_fraction`` of the training data held out with ``seed`` (always for ``digits`` and ``sentiment``).
    Image datasets need ``image``, the model's :class:`ImageSpec`.
    """
    return _load_train_test(dataset, seed, test_fraction, text or TextSpec(), image, options)


def load_test(
    dataset: str,
    seed: int,
    test_fraction: float,
    text: TextSpec | None = None,
    *,
    image: ImageSpec | None = None,
    options: DataOptions = DataOptions(),
) -> tuple[Examples, DataInfo]:
    """The evaluation examples and :class:`DataInfo` of :func:`load_train_test` (the digits' from the
    tensor cache when it holds them: :mod:`.tensor_cache`)."""
    if dataset != "digits":
        _, test, info = load_train_test(dataset, seed, test_fraction, text, image=image, options=options)
        return test, info
    check_bundled_eval_split(dataset, options.eval_split)
    path = tensor_cache.cache_path("held-out", seed=seed, test_fraction=test_fraction)
    cached = tensor_cache.load(path)
    if cached is not None:
        return cached[0], DIGITS_INFO
    _, test, info = load_train_test(dataset, seed, test_fraction, options=options)
    tensor_cache.save(path, [test])
    return test, info


@lru_cache(maxsize=4)
def _load_train_test(
    dataset: str, seed: int, test_fraction: float, text: TextSpec, image: ImageSpec | None, options: DataOptions
) -> tuple[Dataset, Examples, DataInfo]:
    import datasets

    datasets.disable_progress_bars()
    evaluation: Dataset | None
    check_bundled_eval_split(dataset, options.eval_split)
    if dataset in BUNDLED:
        train, evaluation, info = _digits() if dataset == "digits" else _sentiment(seed, text)
    else:
        from .sources import choose_splits, find_image_column, load_splits

        train, evaluation, split = choose_splits(dataset, load_splits(dataset, options.subset), options.eval_split)
        image_column = find_image_column(train, options.image_column)
        if image_column is not None:
            train, evaluation, info = _images(dataset, train, evaluation, split, image_column, image, options)
        else:
            train, evaluation, info = _text(train, evaluation, split, text, options)
    if evaluation is None:
        held_out = train.train_test_split(test_size=test_fraction, seed=seed)
        train, evaluation = held_out["train"], held_out["test"]
    return train, info.to_examples(evaluation), info


def load_federated_data(
    dataset: str,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    seed: int,
    test_fraction: float,
    text: TextSpec | None = None,
    *,
    partition: tuple[tuple[str, Any], ...] = (),
    image: ImageSpec | None = None,
    options: DataOptions = DataOptions(),
) -> FederatedData:
    """Load, split and partition a dataset (cached per process: nodes of one run share it).

    ``partitioner`` names an entry of :data:`PARTITIONERS`, ``alpha`` is its ``dirichlet-alpha`` and
    ``partition`` the ``partition.*`` keys it reads as ``(key, value)`` pairs (missing: their defaults).
    """
    spec = PartitionSpec.from_config({"partitioner": partitioner, "dirichlet-alpha": alpha, **dict(partition)})
    return _load_federated_data(dataset, num_partitions, spec, seed, test_fraction, text or TextSpec(), image, options)


@lru_cache(maxsize=8)
def _load_federated_data(
    dataset: str,
    num_partitions: int,
    spec: PartitionSpec,
    seed: int,
    test_fraction: float,
    text: TextSpec,
    image: ImageSpec | None,
    options: DataOptions,
) -> FederatedData:
    if dataset == "digits":
        return _digits_federated(num_partitions, spec, seed, test_fraction, options)
    train, test, info = _load_train_test(dataset, seed, test_fraction, text, image, options)
    return FederatedData(make_partitioner(spec, num_partitions, seed, train, info.label_column), test, info)


def _digits_federated(
    num_partitions: int, spec: PartitionSpec, seed: int, test_fraction: float, options: DataOptions
) -> FederatedData:
    """The digits' partitions and held-out examples from the tensor cache, or built and stored there."""
    check_bundled_eval_split("digits", options.eval_split)
    identity = {"seed": seed, "test_fraction": test_fraction, "partitioner": spec.name, "settings": spec.settings}
    path = tensor_cache.cache_path("partitions", num_partitions=num_partitions, **identity)
    cached = tensor_cache.load(path)
    if cached is not None and len(cached) == num_partitions + 1:
        return FederatedData.from_partitions(cached[1:], cached[0], DIGITS_INFO)
    train, test, info = _load_train_test("digits", seed, test_fraction, TextSpec(), None, options)
    data = FederatedData(make_partitioner(spec, num_partitions, seed, train, info.label_column), test, info)
    if tensor_cache.enabled():
        tensor_cache.save(path, [test, *(data.partition(p) for p in range(num_partitions))])
    return data


__all__ = [
    "BUNDLED",
    "DataInfo",
    "DataOptions",
    "Examples",
    "FederatedData",
    "ImageSpec",
    "PARTITIONERS",
    "PARTITION_OPTIONS",
    "PartitionSpec",
    "TextSpec",
    "is_image_dataset",
    "load_federated_data",
    "load_test",
    "load_train_test",
    "make_partitioner",
    "sample_batch",
]
