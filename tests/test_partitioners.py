"""Every partitioner of the run config: the label distribution it makes on a small synthetic dataset,
and one-line errors naming the key for bad settings."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from hosfl_flower.config import ConfigError, resolve_run_config
from hosfl_flower.data import PARTITIONERS, PartitionSpec, load_federated_data, make_partitioner

NUM_CLASSES, PER_CLASS, NUM_OWNERS = 5, 120, 6
ROWS = NUM_CLASSES * PER_CLASS


def synthetic() -> Dataset:
    """600 rows: 5 balanced classes (shuffled), 6 owners, a continuous score."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(NUM_CLASSES), PER_CLASS))
    return Dataset.from_dict(
        {
            "label": labels.tolist(),
            "owner": [f"user-{i % NUM_OWNERS}" for i in range(ROWS)],
            "score": rng.normal(size=ROWS).tolist(),
            "word": ["w"] * ROWS,
        }
    )


DATA = synthetic()


def partitions(name: str, num_partitions: int, seed: int = 0, dataset: Dataset = DATA, **settings) -> list[Dataset]:
    config = {"partitioner": name, **{(k if k == "dirichlet-alpha" else f"partition.{k}"): v for k, v in settings.items()}}
    partitioner = make_partitioner(PartitionSpec.from_config(config), num_partitions, seed, dataset, "label")
    return [partitioner.load_partition(i) for i in range(num_partitions)]


def label_sets(parts: list[Dataset]) -> list[set[int]]:
    return [set(part["label"]) for part in parts]


def skew(parts: list[Dataset]) -> float:
    """Mean total-variation distance of each partition's label mix from the uniform mix."""
    distances = []
    for part in parts:
        counts = np.bincount(np.asarray(part["label"]), minlength=NUM_CLASSES)
        distances.append(0.5 * np.abs(counts / counts.sum() - 1 / NUM_CLASSES).sum())
    return float(np.mean(distances))


def sizes(parts: list[Dataset]) -> list[int]:
    return [len(part) for part in parts]


TESTED = set()


def covers(*names):
    TESTED.update(names)
    return lambda function: function


@covers("iid")
def test_iid_splits_evenly_with_the_global_label_mix():
    parts = partitions("iid", 4)
    assert sizes(parts) == [150] * 4
    assert skew(parts) < 0.1
    assert sorted(i for part in parts for i in part["score"]) == sorted(DATA["score"])


@covers("dirichlet")
def test_dirichlet_skews_the_label_mix_by_alpha():
    iid = skew(partitions("iid", 6))
    skewed = partitions("dirichlet", 6, **{"dirichlet-alpha": 0.1, "min-partition-size": 5})
    mild = partitions("dirichlet", 6, **{"dirichlet-alpha": 100.0})
    assert sum(sizes(skewed)) == ROWS and min(sizes(skewed)) >= 5
    assert skew(skewed) > 0.4 > 0.1 > skew(mild) and skew(skewed) > 4 * iid
    balanced = partitions("dirichlet", 6, **{"dirichlet-alpha": 0.1, "self-balancing": True})
    assert max(sizes(balanced)) < max(sizes(skewed)), "self-balancing caps the largest partitions"
    assert sizes(partitions("dirichlet", 6, seed=1, **{"dirichlet-alpha": 0.1})) != sizes(skewed)


@covers("inner-dirichlet")
def test_inner_dirichlet_keeps_the_sizes_and_skews_the_classes():
    parts = partitions("inner-dirichlet", 4, **{"dirichlet-alpha": 0.1})
    assert sizes(parts) == [150] * 4
    assert skew(parts) > 0.3 > skew(partitions("inner-dirichlet", 4, **{"dirichlet-alpha": 1000.0}))
    given = partitions("inner-dirichlet", 3, **{"dirichlet-alpha": 0.5, "partition-sizes": "300,200,100"})
    assert sizes(given) == [300, 200, 100]


@covers("pathological")
def test_pathological_gives_each_partition_exactly_its_classes():
    assert all(len(labels) == 2 for labels in label_sets(partitions("pathological", 5, **{"num-classes-per-partition": 2})))
    deterministic = partitions("pathological", 5, **{"num-classes-per-partition": 3, "class-assignment-mode": "deterministic"})
    assert label_sets(deterministic) == [{i % 5, (i + 1) % 5, (i + 2) % 5} for i in range(5)]
    assert sum(sizes(deterministic)) == ROWS


@covers("shard")
def test_shard_partitions_are_label_sorted_shards():
    parts = partitions("shard", 5, **{"num-shards-per-partition": 2, "shard-size": 60})
    assert sizes(parts) == [120] * 5
    assert all(len(labels) <= 2 for labels in label_sets(parts)), "60-example shards of 120-example classes are pure"
    by_size = partitions("shard", 4, **{"shard-size": 100})  # 6 shards: two partitions get a second one
    assert sorted(sizes(by_size)) == [100, 100, 200, 200]
    by_count = partitions("shard", 4, **{"num-shards-per-partition": 3})  # shard size 600 // 12 = 50
    assert sizes(by_count) == [150] * 4


@covers("linear", "square", "exponential")
@pytest.mark.parametrize("name,weight", [("linear", lambda i: i), ("square", lambda i: i * i), ("exponential", math.exp)])
def test_size_functions_give_sizes_in_proportion(name, weight):
    parts = partitions(name, 4)
    weights = [weight(i) for i in range(1, 5)]
    expected = [int(ROWS * w / sum(weights)) for w in weights]
    expected[-1] += ROWS - sum(expected)  # what rounding leaves goes to the largest
    assert sizes(parts) == expected
    assert abs(sizes(parts)[2] / sizes(parts)[0] - weights[2] / weights[0]) < 0.05 * weights[2] / weights[0]
    assert skew(parts) < 0.2, "sizes differ, the label mix does not"


@covers("size")
def test_size_gives_the_exact_sizes():
    assert sizes(partitions("size", 4, **{"partition-sizes": "100, 50,25,200"})) == [100, 50, 25, 200]


@covers("natural-id")
def test_natural_id_gives_one_partition_per_owner():
    parts = partitions("natural-id", NUM_OWNERS, **{"natural-id-column": "owner"})
    owners = [set(part["owner"]) for part in parts]
    assert all(len(o) == 1 for o in owners) and set.union(*owners) == set(DATA["owner"])
    assert sizes(parts) == [ROWS // NUM_OWNERS] * NUM_OWNERS


@covers("grouped-natural-id")
def test_grouped_natural_id_gives_each_partition_a_group_of_owners():
    parts = partitions("grouped-natural-id", 3, **{"natural-id-column": "owner", "group-size": 2})
    owners = [set(part["owner"]) for part in parts]
    assert all(len(o) == 2 for o in owners) and len(set.union(*owners)) == NUM_OWNERS


@covers("continuous")
def test_continuous_strictness_orders_the_partitions_by_the_column():
    strict = partitions("continuous", 4, **{"partition-by": "score", "strictness": 1.0})
    assert sizes(strict) == [150] * 4
    assert all(max(a["score"]) <= min(b["score"]) for a, b in zip(strict, strict[1:]))
    loose = partitions("continuous", 4, **{"partition-by": "score", "strictness": 0.0})
    means = [float(np.mean(part["score"])) for part in loose]
    assert max(means) - min(means) < 0.3 < float(np.mean(strict[-1]["score"]) - np.mean(strict[0]["score"]))


@covers("distribution")
def test_distribution_gives_adjacent_classes_with_log_normal_shares():
    parts = partitions("distribution", 10, **{"num-classes-per-partition": 2, "preassigned-samples": 3})
    assert label_sets(parts) == [{i % 5, (i + 1) % 5} for i in range(10)]
    assert sum(sizes(parts)) == ROWS
    counts = [np.bincount(np.asarray(part["label"]), minlength=5) for part in parts]
    assert all(count[i % 5] >= 3 and count[(i + 1) % 5] >= 3 for i, count in enumerate(counts))
    assert max(sizes(parts)) > 2 * min(sizes(parts)), "log-normal shares make unequal partitions"


def test_every_partitioner_has_a_distribution_test():
    assert TESTED == set(PARTITIONERS)


def test_a_federated_dataset_takes_the_partition_settings():
    data = load_federated_data("digits", 5, "pathological", 0.3, 0, 0.2, partition=(("partition.num-classes-per-partition", 3),))
    assert all(len(torch.unique(data.partition(i).labels)) == 3 for i in range(5))
    same = load_federated_data("digits", 5, "pathological", 0.3, 0, 0.2, partition=(("partition.num-classes-per-partition", 3),))
    assert same is data


CONFIG_ERRORS = [  # caught when the run config is resolved
    ({"partitioner": "shards"}, "partitioner", "must be one of iid, dirichlet, inner-dirichlet, pathological, shard"),
    ({"partition.num-classes-per-partition": 0}, "partition.num-classes-per-partition", "must be an integer >= 1"),
    ({"partition.self-balancing": "yes"}, "partition.self-balancing", "must be true or false"),
    ({"partition.class-assignment-mode": "round-robin"}, "partition.class-assignment-mode", "must be one of random"),
    ({"partition.strictness": 1.5}, "partition.strictness", "<= 1"),
    ({"partitioner": "shard"}, "partition.shard-size", "needs partition.shard-size or partition.num-shards-per-partition"),
    ({"partitioner": "size"}, "partition.partition-sizes", "comma-separated positive integers"),
    ({"partitioner": "size", "partition.partition-sizes": "10,x"}, "partition.partition-sizes", "comma-separated"),
    ({"partitioner": "inner-dirichlet", "partition.partition-sizes": "5,0"}, "partition.partition-sizes", "positive"),
    ({"partitioner": "natural-id"}, "partition.natural-id-column", "needs the column of each example's owner"),
    ({"dirichlet-alpha": 0.0}, "dirichlet-alpha", "must be a number > 0"),
]


@pytest.mark.parametrize("settings,key,message", CONFIG_ERRORS)
def test_bad_settings_fail_when_the_config_is_resolved(settings, key, message):
    with pytest.raises(ConfigError) as error:
        resolve_run_config(settings)
    text = str(error.value)
    assert f"invalid run-config value {key}=" in text and message in text and "\n" not in text


DATA_ERRORS = [  # caught when the partitioner is first built on the training split
    ("size", 4, {"partition-sizes": "10,20,30"}, "partition.partition-sizes", "names 3 sizes for 4 partitions"),
    ("size", 2, {"partition-sizes": "500,200"}, "partition.partition-sizes", "more than the 600 training examples"),
    ("inner-dirichlet", 2, {"partition-sizes": "500,200"}, "partition.partition-sizes", "more than the 600"),
    ("pathological", 3, {"num-classes-per-partition": 6}, "partition.num-classes-per-partition", "<= the 5 classes"),
    ("dirichlet", 3, {"partition-by": "colour"}, "partition.partition-by", "no such column in the training split"),
    ("dirichlet", 10, {"min-partition-size": 100}, "partition.min-partition-size", "exceed the 600 examples"),
    ("natural-id", 4, {"natural-id-column": "owner"}, "partition.natural-id-column", "makes 6 partitions; the federation has 4"),
    ("natural-id", 6, {"natural-id-column": "user"}, "partition.natural-id-column", "no such column"),
    ("grouped-natural-id", 2, {"natural-id-column": "owner", "group-size": 2}, "partition.group-size", "makes 3 partitions"),
    ("shard", 4, {"shard-size": 200}, "partition.shard-size", "fewer shards than the 4 partitions"),
    ("shard", 4, {"shard-size": 100, "num-shards-per-partition": 2}, "partition.shard-size", "exceed the 600 examples"),
    ("distribution", 4, {"num-classes-per-partition": 2}, "partitioner", "divisible by the 5 classes"),
    ("distribution", 5, {"preassigned-samples": 100}, "partition.preassigned-samples", "too few examples"),
    ("continuous", 2, {"partition-by": "word"}, "partition.partition-by", "needs a numeric column"),
    ("exponential", 12, {}, "partitioner", "not greater than 0"),  # flwr-datasets' own refusal, on one line
]


@pytest.mark.parametrize("name,num_partitions,settings,key,message", DATA_ERRORS)
def test_settings_that_do_not_fit_the_data_fail_with_one_line(name, num_partitions, settings, key, message):
    with pytest.raises(ConfigError) as error:
        partitions(name, num_partitions, **settings)
    text = str(error.value)
    assert f"invalid run-config value {key}=" in text and message in text and "\n" not in text


def test_inner_dirichlet_needs_class_ids():
    with pytest.raises(ConfigError, match="partition.partition-by.*class ids 0..C-1"):
        partitions("inner-dirichlet", 2, dataset=DATA.map(lambda row: {"label": row["label"] * 2}))
