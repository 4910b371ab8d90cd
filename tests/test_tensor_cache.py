"""The digits' tensor cache (hosfl_flower/data/tensor_cache.py): a hit gives the same bits as building
the data, imports none of the data libraries, and a bad file or a cache turned off changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hosfl_flower.data import _load_federated_data, _load_train_test, load_federated_data, load_test, tensor_cache

from .conftest import subprocess_env


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSFL_FLOWER_CACHE", str(tmp_path))
    monkeypatch.delenv(tensor_cache.SWITCH_ENV, raising=False)
    _load_federated_data.cache_clear()
    _load_train_test.cache_clear()
    yield tmp_path / "data"
    _load_federated_data.cache_clear()
    _load_train_test.cache_clear()


def _all(data) -> list[torch.Tensor]:
    parts = [data.partition(p) for p in range(data.num_partitions)]
    return [t for e in [data.test, *parts] for t in (e.inputs["x"], e.labels)]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_a_hit_gives_the_bits_of_the_built_data(cache_dir, partitioner):
    built = load_federated_data("digits", 7, partitioner, 0.3, 4, 0.2)
    assert built.partitioner is not None and len(list(cache_dir.glob("digits-partitions-*.pt"))) == 1
    _load_federated_data.cache_clear()
    hit = load_federated_data("digits", 7, partitioner, 0.3, 4, 0.2)
    assert hit.partitioner is None and hit.num_partitions == 7
    assert all(torch.equal(a, b) for a, b in zip(_all(built), _all(hit), strict=True))
    assert [hit.partition_size(p) for p in range(7)] == [len(built.partitioner.load_partition(p)) for p in range(7)]
    test, info = load_test("digits", 4, 0.2)  # the held-out split alone has a file of its own
    assert torch.equal(test.inputs["x"], built.test.inputs["x"]) and info.num_classes == 10
    assert len(list(cache_dir.glob("digits-held-out-*.pt"))) == 1
    other = load_federated_data("digits", 7, partitioner, 0.3, 5, 0.2)  # another seed: another file
    assert not torch.equal(other.test.labels, built.test.labels) and len(list(cache_dir.glob("*.pt"))) == 3


def test_a_process_that_hits_imports_none_of_the_data_libraries(cache_dir):
    load_federated_data("digits", 3, "iid", 0.3, 0, 0.2)
    load_test("digits", 0, 0.2)
    code = (
        "import sys, json\n"
        "from hosfl_flower.data import load_federated_data, load_test\n"
        "data = load_federated_data('digits', 3, 'iid', 0.3, 0, 0.2)\n"
        "load_test('digits', 0, 0.2)\n"
        "heavy = sorted(m for m in ('datasets', 'flwr_datasets', 'sklearn', 'pandas', 'scipy') if m in sys.modules)\n"
        "print(json.dumps([data.partitioner is None, heavy]))\n"
    )
    env = subprocess_env(HOSFL_FLOWER_CACHE=str(cache_dir.parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [True, []]


def test_a_damaged_file_is_a_miss_and_is_written_again(cache_dir):
    built = load_federated_data("digits", 3, "iid", 0.3, 0, 0.2)
    (path,) = cache_dir.glob("digits-partitions-*.pt")
    path.write_bytes(path.read_bytes()[:100])
    _load_federated_data.cache_clear()
    again = load_federated_data("digits", 3, "iid", 0.3, 0, 0.2)
    assert again.partitioner is not None  # built, not read
    assert all(torch.equal(a, b) for a, b in zip(_all(built), _all(again), strict=True))
    assert tensor_cache.load(path) is not None  # and stored again whole


def test_the_cache_turned_off_reads_and_writes_nothing(cache_dir, monkeypatch):
    monkeypatch.setenv(tensor_cache.SWITCH_ENV, "0")
    assert load_federated_data("digits", 3, "iid", 0.3, 0, 0.2).partitioner is not None
    load_test("digits", 0, 0.2)
    assert not cache_dir.exists() or not list(cache_dir.iterdir())
