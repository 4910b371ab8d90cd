"""Total validation of every message, fuzzed: for every request and reply type of every registered
protocol of the package, an honest record (from short reference runs on the CNN, and of HO-SFL on a tiny
transformer) is mutated by hypothesis — records and keys dropped, added or swapped between record kinds, values of every wrong
type, NaN/inf/huge/negative numbers, tensors of other dtypes and shapes, undecodable bytes — and
``from_record`` must either raise :class:`ReplyError` or return a message within the documented limits
(docs/protocols.md, "Messages"). Any other exception fails the test.

A protocol registered later in the package is covered automatically: the fixture runs each registered
protocol for two rounds in the reference loop and records what crossed the link; a request type no run
sent fails :func:`test_every_message_type_has_an_honest_record` (extend :data:`CONFIG` so it is sent).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hosfl_flower.reference as reference
from hosfl_flower.flower.client_app import hello
from hosfl_flower.flower.link import server_round_of
from hosfl_flower.protocols.messages import (
    MAX_COMPUTE_SECONDS,
    MAX_INT,
    MAX_SEED,
    MAX_STRING,
    VALUE_BOUND,
    HelloRequest,
    ModelSpec,
    Payload,
    ReplyError,
    SmashedBatch,
)
from hosfl_flower.protocols.registry import all_payloads, protocols
from hosfl_flower.records import record_to_tensors

CONFIG = {
    "num-server-rounds": 2,
    "clients-per-round": 2,
    "batch-size": 3,
    "zo.num-perturbations": 2,
    "heron.local-steps": 2,
    "heron.upload-every": 1,
    "cse-fsl.local-steps": 2,
    "cse-fsl.upload-every": 1,
    "fsl-sage.local-steps": 2,
    "fsl-sage.upload-every": 1,
    "mu-splitfed.local-steps": 2,
    "fedavg.local-steps": 1,
    "splitfed.local-steps": 2,
    "eval-every": 100,
    "torch-threads": 1,
}
"""Two short rounds of every protocol on the CNN (the second round's requests carry a ledger catch-up)."""
TRANSFORMER = {
    **CONFIG,
    "strategy": "hosfl",
    "num-server-rounds": 1,
    "batch-size": 2,
    "model": "tiny-gpt2",
    "dataset": "sentiment",
    "task": "causal-lm",
    "max-length": 8,
    "final-sync": False,
    "eval-batch-size": 64,
}
"""One round of HO-SFL on a tiny transformer: smashed batches with companions, token labels ``(B, T)``."""

EXAMPLES = 2000
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def package_requests() -> list[type[Payload]]:
    """The request types of the package's protocols (a protocol a test file registers is not fuzzed here)."""
    return [p for p in all_payloads() if p.reply_type is not None and p.__module__.startswith("hosfl_flower.")]


REQUESTS = package_requests()


# --------------------------------------------------------------------------- honest records
class Honest:
    """One exchange as it crossed the link: the request, the node's reply, the spec replies are read with,
    and the server's model (accepted smashed batches run through its head)."""

    def __init__(self, request: Payload, reply: Payload, spec: ModelSpec) -> None:
        self.request, self.reply, self.spec = request, reply, spec
        self.model: torch.nn.Module | None = None
        self.request_record = self.request.to_record()
        self.request_record["config"] = ConfigRecord({"server-round": 1})  # as the Flower link adds it
        self.reply_record = self.reply.to_record()

    def __repr__(self) -> str:  # what hypothesis prints of a failing example
        return f"<honest {type(self.request).__name__} of {type(self.model).__name__}>"


class Exchanges(dict):
    """The honest exchanges by request type."""

    def __repr__(self) -> str:
        return f"<honest exchanges of {len(self)} request types>"


def record_exchanges(seen: Exchanges, config: Mapping[str, Any], limit: int) -> reference.ReferenceResult:
    """Run ``config`` in the reference loop; keep up to ``limit`` exchanges of each request type in ``seen``."""
    added: list[Honest] = []

    class Recording(reference.InProcessLink):
        def call(self, node, request):
            reply = super().call(node, request)
            assert reply is not None, f"the honest {type(request).__name__} exchange was rejected: {dict(self.rejections)}"
            assert self.spec is not None
            kept = seen.setdefault(type(request), [])
            if sum(e in added for e in kept) < limit:
                kept.append(Honest(request, reply, self.spec))
                added.append(kept[-1])
            return reply

    original = reference.InProcessLink
    reference.InProcessLink = Recording  # type: ignore[misc]
    try:
        result = reference.run_reference(config, 2)
    finally:
        reference.InProcessLink = original  # type: ignore[misc]
    for exchange in added:
        exchange.model = result.model
    client = next(iter(result.clients.values()))
    hello_exchange = Honest(HelloRequest(), hello(client, HelloRequest(), 0), result.protocol.spec)
    hello_exchange.model = result.model
    seen.setdefault(HelloRequest, []).append(hello_exchange)
    return result


@pytest.fixture(scope="module")
def honest() -> Exchanges:
    """The exchanges of two rounds of each registered protocol of the package on the CNN (until each request
    type has been seen), of a round of HO-SFL on a tiny transformer, and a ``query.hello`` of each."""
    seen = Exchanges()
    for name, spec in protocols().items():
        if all(request in seen for request in spec.requests) or not spec.server.__module__.startswith("hosfl_flower."):
            continue
        record_exchanges(seen, {**CONFIG, "strategy": name}, 4)
    del seen[HelloRequest][1:]
    record_exchanges(seen, TRANSFORMER, 2)
    return seen


def test_every_message_type_has_an_honest_record(honest):
    missing = [request.__name__ for request in REQUESTS if request not in honest]
    assert not missing, f"no reference run sent {missing}: extend CONFIG so that they are fuzzed"
    for exchanges in honest.values():
        for exchange in exchanges:  # the honest records read back as they are
            type(exchange.request).from_record(exchange.request_record)
            type(exchange.request).reply_type.from_record(exchange.reply_record, exchange.request, exchange.spec)


def test_the_spec_learns_the_labels_shape_with_or_without_example_labels():
    """``ModelSpec.of`` without labels infers their per-example shape from the logits: ``()`` for a class per
    example, ``(T,)`` for token labels, as the tasks build them."""
    from hosfl_flower.config import resolve_run_config
    from hosfl_flower.task import server_model_and_test

    for config, expected in ((CONFIG, ()), (TRANSFORMER, (TRANSFORMER["max-length"],))):
        model, test = server_model_and_test(resolve_run_config(config))
        example = test.take(torch.arange(1))
        assert ModelSpec.of(model, example.inputs, example.labels).label_shape == expected
        assert ModelSpec.of(model, example.inputs).label_shape == expected
        assert set(ModelSpec.of(model, example.inputs).smashed_layout or {}) == set(model.smash(example.inputs))


# --------------------------------------------------------------------------- mutations
# Hypothesis draws one byte string per example; the mutation below consumes it as a stream of choices
# (an exhausted stream reads as zeros: the first, simplest option of every choice). One draw is much
# cheaper than hundreds of small ones, and examples stay reproducible and shrinkable.
CHOICES = st.binary(max_size=96)

NAMES = (
    "meta", "node", "smashed", "labels", "arrays", "aux-head", "scalars", "sync", "ledger", "client-state", "seeds",
    "activation-grad", "step", "heron", "fedavg", "cse-fsl", "fsl-sage", "seed", "scalar", "config", "smashed.0", "labels.0", "smashed.1", "labels.1", "smashed.2", "x",
)  # fmt: skip
"""Record names a mutation may add (those of every message, and a stranger)."""
KEYS = (
    "compute-seconds", "num-examples", "applied-round", "fingerprint", "partition-id", "num-partitions", "values", "steps",
    "from-round", "replacement-round", "rounds", "counts", "seeds", "scalars", "lr", "mu", "directions", "estimator",
    "step", "last", "local-steps", "upload-every", "head", "train-loss", "server-round", "z", "y", "attention_mask",
    "z~0", "z~1", "z~2", "z+", "z-", "seed", "scalar", "optimizer.x", "",
)  # fmt: skip
"""Keys a mutation may add to a record."""

EDGE_INTS = (0, 1, -1, 2, 3, 7, -100, 10, 2**31, 2**53, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30, -(10**30))
EDGE_FLOATS: tuple[float, ...] = (0.0, -0.0, 0.5, -1.0, 1e-9, 1e12, 1e12 * 1.0001, -1e12 * 1.0001, 86400.0, 86401.0)
EDGE_FLOATS += (1e300, -1e300, math.nan, math.inf, -math.inf, 5e-324)
TEXTS = ("", "x", "forward", "central", "gaussian", "rademacher", "linear", "mlp", "0" * 32, "y" * (MAX_STRING + 1), "é\x00")
DTYPES = ("float64", "float16", "float32", "int64", "int32", "int8", "uint8", "bool", "complex64", "uint16", "uint64", ">f4")
KINDS = (ConfigRecord, MetricRecord, ArrayRecord)


class Choices:
    """A stream of choices read from hypothesis's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def raw(self, size: int = 8) -> int:
        """The next ``size`` bytes as an unsigned integer."""
        value = int.from_bytes(self.data[self.at : self.at + size], "little")
        self.at += size
        return value

    def below(self, n: int) -> int:
        return self.raw(1 if n <= 256 else 8) % n if n > 0 else 0

    def pick(self, options: Any) -> Any:
        return options[self.below(len(options))]

    def flag(self) -> bool:
        return bool(self.raw(1) & 1)

    def int_(self) -> int:
        how = self.below(3)
        if how == 0:
            return self.pick(EDGE_INTS)
        raw = self.raw()
        return raw - 2**63 if how == 1 else (raw - 2**63) * 2**40  # any 64-bit int, or far beyond

    def float_(self) -> float:
        if self.below(3) == 0:
            return struct.unpack("<d", self.raw().to_bytes(8, "little"))[0]  # any double: NaN, inf, subnormal, huge
        return self.pick(EDGE_FLOATS)

    def metric_value(self) -> Any:
        how = self.below(4)
        if how == 0:
            return self.int_()
        if how == 1:
            return self.float_()
        if how == 2:
            return [self.int_() for _ in range(self.below(5))]
        return [self.float_() for _ in range(self.below(5))]

    def config_value(self) -> Any:
        how = self.below(8)
        if how < 4:
            return self.metric_value()
        if how == 4:
            return self.flag()
        if how == 5:
            return self.pick(TEXTS) if self.flag() else "".join(chr(32 + self.below(200)) for _ in range(self.below(6)))
        if how == 6:
            return bytes(self.below(256) for _ in range(self.below(4)))
        return [self.flag() for _ in range(self.below(3))] if self.flag() else [self.pick(TEXTS) for _ in range(self.below(3))]


def same_kind(c: Choices, value: Any) -> Any:
    """A random value of ``value``'s type (it passes the type checks and probes the bounds)."""
    if isinstance(value, bool):
        return c.flag()
    if isinstance(value, int):
        return c.int_()
    if isinstance(value, float):
        return c.float_()
    if isinstance(value, str):
        return c.pick(TEXTS)
    if isinstance(value, list):
        sample = value[0] if value else 0
        return [same_kind(c, sample) for _ in range(c.below(2 * len(value) + 2))]
    return value


def nearby(c: Choices, value: Any) -> Any:
    """A value close to an honest one (it passes the type checks and probes the bounds)."""
    if isinstance(value, bool):
        return c.pick((not value, int(value), float(value), str(value)))
    if isinstance(value, int):
        return c.pick((value + 1, value - 1, -value - 1, value * 2**40, -value, float(value), True, 2**53 - value))
    if isinstance(value, float):
        integral = int(value) if math.isfinite(value) else 0
        return c.pick((-value, value * 1e15, math.nan, math.inf, -math.inf, integral, 0.0, -1e-300, value + 86400))
    if isinstance(value, str):
        return c.pick((value + "0", value[:-1], value * 9, value.upper(), ""))
    if isinstance(value, list):
        how = c.below(6)
        if how == 0 and value:
            return value[:-1]
        if how == 1:
            return [*value, value[-1] if value else 0]
        if how == 2 and value:
            index = c.below(len(value))
            return [*value[:index], nearby(c, value[index]), *value[index + 1 :]]
        if how == 3:
            return value * 2
        if how == 4 and value:
            return value[0]
        return []
    return value


def tensor_variant(c: Choices, tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` with another dtype, shape or values."""
    how = c.below(5)
    t = tensor.clone()
    if how == 0:
        return t.numpy().astype(c.pick(DTYPES))
    if how == 1:
        shape = c.below(8)
        if shape == 0:
            t = t.flatten()[0] if t.numel() else torch.tensor(0, dtype=t.dtype)  # 0-d
        elif shape == 1:
            t = t.unsqueeze(c.below(t.dim() + 1))  # an extra dimension
        elif shape == 2 and t.dim() and t.shape[0]:
            t = t[0]  # one dimension less
        elif shape == 3:
            t = t[:0]  # empty
        elif shape == 4 and t.dim():
            t = t[:-1]  # fewer examples
        elif shape == 5 and t.dim():
            t = torch.cat([t, t[:1]])  # more
        elif shape == 6:
            t = t.flatten()
        elif t.dim() >= 2:
            t = t.transpose(0, -1).contiguous()
        return t.numpy()
    if how in (2, 3) and t.numel():
        if t.is_floating_point():
            value = c.pick((math.nan, math.inf, -math.inf, 1e13, -1e13, 1e12, 1e30))
            t = t if t.dtype in (torch.float32, torch.float64) else t.float()
        else:
            value = c.pick((-1, -100, 10, 2**40, 2**62, -(2**63), 7))
            t = t.long()
        flat = t.flatten()
        if c.flag():
            flat[c.below(flat.numel())] = value
        else:
            flat.fill_(value)
        return flat.reshape(t.shape).numpy()
    dims = tuple(c.below(4) for _ in range(c.below(4)))
    if c.flag():
        return np.full(dims, c.pick((0.0, 1.0, math.nan)), dtype=np.float32)
    return np.full(dims, c.pick((0, 1, -100)), dtype=np.int64)


def array_variant(c: Choices, tensor: torch.Tensor | None) -> Array:
    """An ``Array``: a variant of ``tensor``, or bytes that do not decode."""
    how = c.below(12)  # 9: truncated, 10: another stype, 11: garbage, else: a variant of the tensor
    if how < 9:
        if tensor is None:
            tensor = torch.zeros(2, 3)
        return Array(np.ascontiguousarray(tensor_variant(c, tensor)))
    honest = Array(np.zeros((2, 3), dtype=np.float32) if tensor is None else tensor.numpy())
    if how == 9:
        data = honest.data[: c.below(len(honest.data) + 1)]
        return Array(dtype=honest.dtype, shape=tuple(honest.shape), stype=honest.stype, data=data)  # truncated
    if how == 10:
        return Array(dtype=honest.dtype, shape=tuple(honest.shape), stype="torch.Tensor", data=honest.data)  # another stype
    data = b"\x93NUMPY" * c.flag() + bytes(c.below(256) for _ in range(c.below(40)))
    return Array(dtype="float32", shape=(2, 3), stype=honest.stype, data=data)  # garbage


def decoded(array: Array | None) -> torch.Tensor | None:
    """The tensor of ``array`` (``None`` if there is none, or if an earlier mutation made it undecodable)."""
    if array is None:
        return None
    try:
        return record_to_tensors(ArrayRecord({"t": array}))["t"]
    except Exception:  # noqa: BLE001
        return None


def record_of_kind(c: Choices, kind: type, keys: list[str]) -> Any:
    """A record of ``kind`` with ``keys`` and values drawn at random."""
    if kind is ArrayRecord:
        return ArrayRecord({k: array_variant(c, None) for k in keys})
    return kind({k: c.metric_value() if kind is MetricRecord else c.config_value() for k in keys})


def mutate_record(c: Choices, record: Any) -> Any:
    """A copy of ``record`` with one entry dropped, added or changed."""
    keys = list(record.keys())
    how = c.below(8)  # 6: drop, 7: add, else: change
    key = c.pick(keys) if keys and how != 7 else c.pick(KEYS)
    if isinstance(record, ArrayRecord):
        entries = dict(record.items())
        if how == 6:
            entries.pop(key, None)
        else:
            entries[key] = array_variant(c, decoded(entries.get(key)))
        return ArrayRecord(entries)
    entries = dict(record)
    if how == 6:
        entries.pop(key, None)
        return type(record)(entries)
    metric = isinstance(record, MetricRecord)
    how = c.below(4) if key in entries else 3  # 0: nearby, 1: of the same type, else: any value
    if how == 0:
        entries[key] = nearby(c, entries[key])
    elif how == 1:
        entries[key] = same_kind(c, entries[key])
    else:
        entries[key] = c.metric_value() if metric else c.config_value()
    try:
        return type(record)(entries)
    except TypeError:  # a value this kind of record cannot hold (a bool in a MetricRecord): a number then
        entries[key] = c.metric_value()
        return type(record)(entries)


def mutated(c: Choices, base: RecordDict) -> RecordDict:
    """``base`` after one to three mutations (``base`` itself is never changed)."""
    content = dict(base.items())
    for _ in range(c.pick((1, 1, 1, 2, 2, 3))):
        how = c.pick("eeeeeeeeeedaakkz")  # an entry of a record, drop, add, another kind, empty
        names = list(content)
        if how == "a" or not names:
            keys = list(dict.fromkeys(c.pick(KEYS) for _ in range(c.below(4))))
            content[c.pick(NAMES)] = record_of_kind(c, c.pick(KINDS), keys)
            continue
        name = c.pick(names)
        if how == "d":
            del content[name]
        elif how == "z":
            content[name] = type(content[name])()
        elif how == "k":  # the same keys in another kind of record
            kind = c.pick([k for k in KINDS if not isinstance(content[name], k)])
            content[name] = record_of_kind(c, kind, list(content[name].keys()))
        else:
            content[name] = mutate_record(c, content[name])
    return RecordDict(content)


# --------------------------------------------------------------------------- what an accepted message satisfies
INT_FIELDS_BELOW_MAX_INT = {"num_examples", "applied_round", "partition_id", "num_partitions", "step", "steps", "local_steps"}
INT_FIELDS_BELOW_MAX_INT |= {"upload_every", "from_round", "replacement_round", "round"}


def check_value(value: Any, honest: Any, where: str) -> None:
    """``value`` (a field of an accepted message) has ``honest``'s type and is within the limits."""
    assert value is None or honest is None or type(value) is type(honest), (
        f"{where}: {type(value).__name__}, honest {type(honest).__name__}"
    )
    if isinstance(value, torch.Tensor):
        if value.numel() and value.dtype != torch.bool:
            if value.is_floating_point():
                assert bool(torch.isfinite(value).all()), where
                assert float(value.abs().max()) <= VALUE_BOUND, where
            else:
                assert not value.is_complex(), where
                assert -VALUE_BOUND <= int(value.min()) and int(value.max()) <= VALUE_BOUND, where
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        name = where.rsplit(".", 1)[-1].split("[")[0]
        assert 0 <= value <= (MAX_INT if name in INT_FIELDS_BELOW_MAX_INT else MAX_SEED), f"{where} = {value}"
    elif isinstance(value, float):
        assert math.isfinite(value), where
        if where.endswith("compute_seconds"):
            assert 0 <= value <= MAX_COMPUTE_SECONDS, where
        else:
            assert abs(value) <= VALUE_BOUND, where
    elif isinstance(value, str):
        assert len(value) <= MAX_STRING, where
    elif isinstance(value, Mapping):
        for key, item in value.items():
            assert isinstance(key, str), where
            check_value(item, honest.get(key) if isinstance(honest, Mapping) else None, f"{where}[{key}]")
    elif isinstance(value, (list, tuple)):
        sample = honest[0] if isinstance(honest, (list, tuple)) and honest else None
        for index, item in enumerate(value):
            check_value(item, sample, f"{where}[{index}]")
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            check_value(getattr(value, field.name), getattr(honest, field.name, None), f"{where}.{field.name}")


def per_example(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape[1:]), v.dtype) for k, v in tensors.items()}


def check_batch(batch: SmashedBatch, honest: SmashedBatch, num_classes: int, model: Any) -> None:
    """An accepted smashed batch is shaped like the honest one (per example), its labels are classes, and
    the server segment runs on it."""
    assert per_example(batch.smashed) == per_example(honest.smashed)
    assert per_example({"y": batch.labels}) == per_example({"y": honest.labels})
    assert batch.labels.dtype == torch.int64 and all(t.shape[0] == batch.num_examples >= 1 for t in batch.smashed.values())
    labels = batch.labels if honest.labels.dim() == 1 else batch.labels[batch.labels != -100]  # token labels: -100 ignored
    assert labels.numel() and int(labels.min()) >= 0 and int(labels.max()) < num_classes
    with torch.no_grad():
        model.loss(model.head(batch.smashed), batch.labels)


def check_reply(reply: Payload, exchange: Honest) -> None:
    """``reply`` (accepted) has the honest reply's types within the limits, batches and states shaped like its
    (a state exactly), and as many perturbed activations as the request has seeds."""
    check_value(reply, exchange.reply, type(reply).__name__)
    for field in dataclasses.fields(reply):  # type: ignore[arg-type]
        value, honest = getattr(reply, field.name), getattr(exchange.reply, field.name)
        for batch in value if isinstance(value, list) else [value]:
            if isinstance(batch, SmashedBatch):
                check_batch(batch, honest[0] if isinstance(honest, list) else honest, exchange.spec.num_classes, exchange.model)
    perturbed = getattr(reply, "perturbed", None)
    if perturbed is not None:
        z = reply.batch.smashed["z"]  # type: ignore[attr-defined]
        assert len(perturbed) == len(exchange.request.seeds)  # type: ignore[attr-defined]
        assert all(t.shape == z.shape and t.dtype == z.dtype for t in perturbed)
    for name in ("client_state", "head_state", "weights"):
        state, honest_state = getattr(reply, name, None), getattr(exchange.reply, name, None)
        if isinstance(state, dict) and isinstance(honest_state, dict):
            assert {k: (v.shape, v.dtype) for k, v in state.items()} == {k: (v.shape, v.dtype) for k, v in honest_state.items()}


def unchanged(content: RecordDict, before: list[tuple[str, type, list[str]]]) -> bool:
    return [(n, type(r), list(r.keys())) for n, r in content.items()] == before


# --------------------------------------------------------------------------- the properties
@pytest.mark.parametrize("request_type", REQUESTS, ids=lambda r: r.reply_type.__name__)
@FUZZ
@given(choices=CHOICES)
def test_a_mutated_reply_is_valid_or_a_reply_error(honest, request_type, choices):
    c = Choices(choices)
    exchange = c.pick(honest[request_type])
    content = mutated(c, exchange.reply_record)
    before = [(n, type(r), list(r.keys())) for n, r in content.items()]
    try:
        reply = request_type.reply_type.from_record(content, exchange.request, exchange.spec)
    except ReplyError:
        assert unchanged(content, before)
        return
    assert unchanged(content, before)
    check_reply(reply, exchange)


@pytest.mark.parametrize("request_type", REQUESTS, ids=lambda r: r.__name__)
@FUZZ
@given(choices=CHOICES)
def test_a_mutated_request_is_valid_or_a_reply_error_on_the_node(honest, request_type, choices):
    c = Choices(choices)
    exchange = c.pick(honest[request_type])
    content = mutated(c, exchange.request_record)
    try:
        request = request_type.from_record(content)
        server_round = server_round_of(content)
    except ReplyError:
        return
    assert 0 <= server_round <= MAX_INT
    check_value(request, exchange.request, request_type.__name__)
