"""Every ``flwr-datasets`` partitioner that splits examples (rows) across nodes, by run-config name.

:data:`PARTITIONERS` is the one table: each name lists the run-config keys it reads and builds its
partitioner from them; adding a partitioner is one entry (and its new keys in
:data:`PARTITION_OPTIONS`). Parameters live under ``partition.`` (TOML cannot hold a key
``partitioner`` and keys ``partitioner.x`` together); ``dirichlet-alpha`` is the concentration of
``dirichlet`` and ``inner-dirichlet``.

Left out: ``IdToSizeFncPartitioner`` takes a Python function (``linear``, ``square`` and
``exponential`` are its run-config forms), and ``VerticalEvenPartitioner`` /
``VerticalSizePartitioner`` split columns, not rows (vertical federated learning; split learning
here is horizontal: every node holds whole examples).

Settings are checked when the run config is resolved (:meth:`PartitionSpec.from_config`) and against
the training split when the partitioner is built (:func:`make_partitioner`); both raise
:class:`~hosfl_flower.options.ConfigError` with one line naming the key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..options import ConfigError, Option

if TYPE_CHECKING:  # imported lazily: each deployment ClientApp process pays for its imports
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner

PARTITION_BY = "partition.partition-by"
SIZES = "partition.partition-sizes"
CLASSES = "partition.num-classes-per-partition"
NATURAL_ID = "partition.natural-id-column"
SHARDS = "partition.num-shards-per-partition"
SHARD_SIZE = "partition.shard-size"


@dataclass(frozen=True)
class PartitionContext:
    """What a builder gets: the partitioner's settings (key -> value), the federation and the training split."""

    settings: Mapping[str, Any]
    num_partitions: int
    seed: int
    dataset: Dataset
    label_column: str

    def __getitem__(self, key: str) -> Any:
        return self.settings[key]

    def column(self, key: str = PARTITION_BY) -> str:
        """The column named by ``key`` (``partition.partition-by`` empty: the label column); it must exist."""
        name = self.settings[key] or (self.label_column if key == PARTITION_BY else "")
        if name not in self.dataset.column_names:
            raise ConfigError(key, name, f"no such column in the training split; columns: {', '.join(self.dataset.column_names)}")
        return name

    def values(self, key: str = PARTITION_BY) -> np.ndarray:
        """The values of the column named by ``key``."""
        return np.asarray(self.dataset[self.column(key)])


@dataclass(frozen=True)
class PartitionerEntry:
    """One partitioner name: the keys it reads, its builder, and its checks without data."""

    keys: tuple[str, ...]
    build: Callable[[PartitionContext], Partitioner]
    check: Callable[[Mapping[str, Any]], None] | None = None
    """Checks of the settings alone, when the run config is resolved (raise :class:`ConfigError`)."""
    count_key: str = "partitioner"
    """The key to name when the partitioner makes a different number of partitions than the federation has."""


def _sizes(settings: Mapping[str, Any], required: bool) -> tuple[int, ...] | None:
    text = settings[SIZES].strip()
    if not text and not required:
        return None
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ConfigError(SIZES, settings[SIZES], "must be comma-separated positive integers, one per partition")
    return sizes


def _check_sizes(settings: Mapping[str, Any]) -> None:
    _sizes(settings, required=True)


def _check_optional_sizes(settings: Mapping[str, Any]) -> None:
    _sizes(settings, required=False)


def _checked_sizes(ctx: PartitionContext, sizes: tuple[int, ...]) -> list[int]:
    if len(sizes) != ctx.num_partitions:
        raise ConfigError(SIZES, ctx[SIZES], f"names {len(sizes)} sizes for {ctx.num_partitions} partitions")
    if sum(sizes) > len(ctx.dataset):
        raise ConfigError(SIZES, ctx[SIZES], f"sums to {sum(sizes)}, more than the {len(ctx.dataset)} training examples")
    return list(sizes)


def _num_classes(ctx: PartitionContext, key: str) -> int:
    classes = len(np.unique(ctx.values()))
    if ctx[key] > classes:
        raise ConfigError(key, ctx[key], f"must be <= the {classes} classes of the training split")
    return classes


def _iid(ctx: PartitionContext) -> Partitioner:
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=ctx.num_partitions)


def _dirichlet(ctx: PartitionContext) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner

    key = "partition.min-partition-size"
    if ctx[key] * ctx.num_partitions > len(ctx.dataset):
        raise ConfigError(key, ctx[key], f"{ctx.num_partitions} partitions of that size exceed the {len(ctx.dataset)} examples")
    return DirichletPartitioner(
        num_partitions=ctx.num_partitions,
        partition_by=ctx.column(),
        alpha=ctx["dirichlet-alpha"],
        min_partition_size=ctx[key],
        self_balancing=ctx["partition.self-balancing"],
        seed=ctx.seed,
    )


def _inner_dirichlet(ctx: PartitionContext) -> Partitioner:
    from flwr_datasets.partitioner import InnerDirichletPartitioner

    labels = np.unique(ctx.values())
    if not np.issubdtype(labels.dtype, np.integer) or not np.array_equal(labels, np.arange(len(labels))):
        raise ConfigError(
            PARTITION_BY, ctx[PARTITION_BY], "inner-dirichlet needs class ids 0..C-1, each present in the training split"
        )
    sizes = _sizes(ctx.settings, required=False)
    if sizes is None:
        whole, extra = divmod(len(ctx.dataset), ctx.num_partitions)
        sizes = tuple(whole + (index < extra) for index in range(ctx.num_partitions))
    return InnerDirichletPartitioner(
        partition_sizes=_checked_sizes(ctx, sizes),
        partition_by=ctx.column(),
        alpha=ctx["dirichlet-alpha"],
        seed=ctx.seed,
    )


def _pathological(ctx: PartitionContext) -> Partitioner:
    from flwr_datasets.partitioner import PathologicalPartitioner

    _num_classes(ctx, CLASSES)
    return PathologicalPartitioner(
        num_partitions=ctx.num_partitions,
        partition_by=ctx.column(),
        num_classes_per_partition=ctx[CLASSES],
        class_assignment_mode=ctx["partition.class-assignment-mode"],
        seed=ctx.seed,
    )


def _check_shard(settings: Mapping[str, Any]) -> None:
    if not settings[SHARDS] and not settings[SHARD_SIZE]:
        raise ConfigError(SHARD_SIZE, 0, f"partitioner=shard needs {SHARD_SIZE} or {SHARDS} above 0")


def _shard(ctx: PartitionContext) -> Partitioner:
    from flwr_datasets.partitioner import ShardPartitioner

    shards, size, rows, parts = ctx[SHARDS] or None, ctx[SHARD_SIZE] or None, len(ctx.dataset), ctx.num_partitions
    if shards and size and shards * size * parts > rows:
        raise ConfigError(SHARD_SIZE, size, f"{parts} partitions of {shards} shards of {size} exceed the {rows} examples")
    if shards and not size and rows // (shards * parts) < 1:
        raise ConfigError(SHARDS, shards, f"{parts} partitions of {shards} shards leave shards of no example ({rows} examples)")
    usable = (-(-rows // size) if ctx["partition.keep-incomplete-shard"] else rows // size) if size else 0
    if size and not shards and usable < parts:
        raise ConfigError(SHARD_SIZE, size, f"makes fewer shards than the {parts} partitions ({rows} examples)")
    return ShardPartitioner(
        num_partitions=parts,
        partition_by=ctx.column(),
        num_shards_per_partition=shards,
        shard_size=size,
        keep_incomplete_shard=ctx["partition.keep-incomplete-shard"],
        seed=ctx.seed,
    )


def _by_size_function(name: str) -> Callable[[PartitionContext], Partitioner]:
    def build(ctx: PartitionContext) -> Partitioner:
        import flwr_datasets.partitioner as partitioners

        return getattr(partitioners, name)(num_partitions=ctx.num_partitions)

    return build


def _size(ctx: PartitionContext) -> Partitioner:
    from flwr_datasets.partitioner import SizePartitioner

    sizes = _sizes(ctx.settings, required=True)
    assert sizes is not None
    return SizePartitioner(partition_sizes=_checked_sizes(ctx, sizes))


def _check_natural_id(settings: Mapping[str, Any]) -> None:
    if not settings[NATURAL_ID]:
        raise ConfigError(NATURAL_ID, "", f"partitioner={settings['partitioner']} needs the column of each example's owner id")


def _natural_id(ctx: PartitionContext) -> Partitioner:
    from flwr_datasets.partitioner import NaturalIdPartitioner

    return NaturalIdPartitioner(partition_by=ctx.column(NATURAL_ID))


def _grouped_natural_id(ctx: PartitionContext) -> Partitioner:
    from flwr_datasets.partitioner import GroupedNaturalIdPartitioner

    return GroupedNaturalIdPartitioner(
        partition_by=ctx.column(NATURAL_ID),
        group_size=ctx["partition.group-size"],
        mode=ctx["partition.group-mode"],
        sort_unique_ids=True,
    )


def _continuous(ctx: PartitionContext) -> Partitioner:
    from flwr_datasets.partitioner import ContinuousPartitioner

    column = ctx.column()
    if not np.issubdtype(ctx.values().dtype, np.number):
        raise ConfigError(PARTITION_BY, column, "partitioner=continuous needs a numeric column")
    return ContinuousPartitioner(
        num_partitions=ctx.num_partitions, partition_by=column, strictness=ctx["partition.strictness"], seed=ctx.seed
    )


def _distribution(ctx: PartitionContext) -> Partitioner:
    """Each partition gets ``k`` adjacent classes; class shares across partitions are log-normal (FedProx's setup)."""
    from flwr_datasets.partitioner import DistributionPartitioner

    per_partition, parts = ctx[CLASSES], ctx.num_partitions
    classes = _num_classes(ctx, CLASSES)
    if parts % classes:
        raise ConfigError(
            "partitioner", "distribution", f"needs a number of partitions ({parts}) divisible by the {classes} classes"
        )
    columns = per_partition * parts // classes
    key = "partition.preassigned-samples"
    counts = np.unique(ctx.values(), return_counts=True)[1]
    if (counts - ctx[key] * columns < columns).any():
        raise ConfigError(
            key, ctx[key], f"leaves too few examples: the smallest class has {counts.min()} for {columns} partitions"
        )
    shares = np.random.default_rng(ctx.seed).lognormal(0.0, ctx["partition.sigma"], (classes, columns))
    return DistributionPartitioner(
        distribution_array=shares,
        num_partitions=parts,
        num_unique_labels_per_partition=per_partition,
        partition_by=ctx.column(),
        preassigned_num_samples_per_label=ctx[key],
        seed=ctx.seed,
    )


PARTITIONERS: dict[str, PartitionerEntry] = {
    "iid": PartitionerEntry((), _iid),
    "dirichlet": PartitionerEntry(
        ("dirichlet-alpha", PARTITION_BY, "partition.min-partition-size", "partition.self-balancing"), _dirichlet
    ),
    "inner-dirichlet": PartitionerEntry(("dirichlet-alpha", PARTITION_BY, SIZES), _inner_dirichlet, check=_check_optional_sizes),
    "pathological": PartitionerEntry((PARTITION_BY, CLASSES, "partition.class-assignment-mode"), _pathological),
    "shard": PartitionerEntry((PARTITION_BY, SHARDS, SHARD_SIZE, "partition.keep-incomplete-shard"), _shard, check=_check_shard),
    "linear": PartitionerEntry((), _by_size_function("LinearPartitioner")),
    "square": PartitionerEntry((), _by_size_function("SquarePartitioner")),
    "exponential": PartitionerEntry((), _by_size_function("ExponentialPartitioner")),
    "size": PartitionerEntry((SIZES,), _size, check=_check_sizes),
    "natural-id": PartitionerEntry((NATURAL_ID,), _natural_id, check=_check_natural_id, count_key=NATURAL_ID),
    "grouped-natural-id": PartitionerEntry(
        (NATURAL_ID, "partition.group-size", "partition.group-mode"),
        _grouped_natural_id,
        check=_check_natural_id,
        count_key="partition.group-size",
    ),
    "continuous": PartitionerEntry((PARTITION_BY, "partition.strictness"), _continuous),
    "distribution": PartitionerEntry((PARTITION_BY, CLASSES, "partition.sigma", "partition.preassigned-samples"), _distribution),
}
"""Partitioner name -> the run-config keys it reads and its builder."""

PARTITION_OPTIONS: dict[str, Option] = {
    "partitioner": Option(
        "iid",
        "how training data is split across nodes (flwr-datasets partitioners; settings under partition.)",
        choices=tuple(PARTITIONERS),
    ),
    "dirichlet-alpha": Option(
        0.3,
        "Dirichlet concentration of partitioner=dirichlet (per class over partitions) and inner-dirichlet "
        "(per partition over classes); smaller is more skewed",
        minimum=0.0,
        exclusive_minimum=True,
    ),
    PARTITION_BY: Option(
        "",
        "column dirichlet, inner-dirichlet, pathological, shard, distribution and continuous split by (empty: the label column)",
    ),
    "partition.min-partition-size": Option(2, "dirichlet: redraw until every partition has this many examples", minimum=0),
    "partition.self-balancing": Option(False, "dirichlet: a partition above the average size gets no more examples"),
    CLASSES: Option(2, "pathological and distribution: classes per partition", minimum=1),
    "partition.class-assignment-mode": Option(
        "random",
        "pathological: which classes a partition gets (random, deterministic: consecutive, first-deterministic: "
        "the first one consecutive)",
        choices=("random", "deterministic", "first-deterministic"),
    ),
    SHARDS: Option(0, "shard: shards per partition (0: as many as partition.shard-size gives)", minimum=0),
    SHARD_SIZE: Option(
        0, "shard: examples per shard of label-sorted data (0: from partition.num-shards-per-partition)", minimum=0
    ),
    "partition.keep-incomplete-shard": Option(False, "shard: keep the last, smaller shard (with partition.shard-size alone)"),
    SIZES: Option("", "size: comma-separated example counts, one per partition; inner-dirichlet: the same (empty: equal sizes)"),
    NATURAL_ID: Option("", "natural-id and grouped-natural-id: the column of each example's owner (one partition per owner)"),
    "partition.group-size": Option(2, "grouped-natural-id: owners per partition", minimum=1),
    "partition.group-mode": Option(
        "allow-smaller",
        "grouped-natural-id: what left-over owners do (allow-smaller: a smaller last group, allow-bigger: join "
        "groups, drop-reminder: are dropped, strict: are an error)",
        choices=("allow-smaller", "allow-bigger", "drop-reminder", "strict"),
    ),
    "partition.strictness": Option(
        0.5, "continuous: 0 = iid, 1 = partitions are consecutive ranges of the column", minimum=0.0, maximum=1.0
    ),
    "partition.sigma": Option(
        2.0, "distribution: sigma of the log-normal each class's shares are drawn from", minimum=0.0, exclusive_minimum=True
    ),
    "partition.preassigned-samples": Option(
        5, "distribution: examples of each of its classes a partition gets before the log-normal shares", minimum=0
    ),
}
"""The run-config keys of partitioning, with defaults and help."""


@dataclass(frozen=True)
class PartitionSpec:
    """A partitioner's name and the checked values of the keys it reads (hashable, for caching)."""

    name: str = "iid"
    settings: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PartitionSpec:
        """The spec of a run config (missing keys take their defaults); raises :class:`ConfigError`."""

        def value(key: str) -> Any:
            return PARTITION_OPTIONS[key].check(key, config.get(key, PARTITION_OPTIONS[key].default))

        name = value("partitioner")
        entry = PARTITIONERS[name]
        settings = {"partitioner": name, **{key: value(key) for key in entry.keys}}
        if entry.check is not None:
            entry.check(settings)
        return cls(name, tuple((key, settings[key]) for key in entry.keys))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def make_partitioner(spec: PartitionSpec, num_partitions: int, seed: int, dataset: Dataset, label_column: str) -> Partitioner:
    """The partitioner of ``spec`` over ``dataset`` (the training split), its partitions determined.

    A setting that does not fit the data raises :class:`ConfigError` naming the key (``partitioner``
    for what ``flwr-datasets`` itself refuses).
    """
    entry = PARTITIONERS[spec.name]
    ctx = PartitionContext(dict(spec.settings), num_partitions, seed, dataset, label_column)
    try:
        partitioner = entry.build(ctx)
        partitioner.dataset = dataset
        made = partitioner.num_partitions
        if made != num_partitions:
            key = entry.count_key
            raise ConfigError(
                key, ctx.settings.get(key, spec.name), f"makes {made} partitions; the federation has {num_partitions}"
            )
        partitioner.load_partition(0)  # every partitioner determines all its partitions on the first load
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError("partitioner", spec.name, _one_line(error)) from error
    return partitioner


__all__ = ["PARTITIONERS", "PARTITION_OPTIONS", "PartitionContext", "PartitionSpec", "PartitionerEntry", "make_partitioner"]
