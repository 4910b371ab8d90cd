"""Typed messages: the base every protocol's requests and replies derive from, and the record pieces
several protocols share (smashed batches, client-segment states, ledger catch-up, node identity).

A :class:`Payload` is a dataclass that knows its records: :meth:`Payload.to_record` writes them,
:meth:`Payload.from_record` reads and validates them (a reply: against the request it answers and the
:class:`ModelSpec`), raising :class:`ReplyError` with a short reason. :attr:`Payload.categories`
declares the accounting category of each record (docs/protocols.md, "Accounting").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..accounting import CATEGORIES
from ..models import SplitModel
from ..records import ledger_to_record, record_to_ledger, record_to_tensors, tensors_to_record
from ..zo import LedgerEntry

VALUE_BOUND = 1e12
"""Largest magnitude a reply's values may have (a larger one is ``out-of-range``)."""


class ReplyError(Exception):
    """A message failed validation; ``reason`` is the short name it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ModelSpec:
    """What replies are checked against: one example's ``z``, the classes, the client segment's layout."""

    z_example: torch.Tensor
    num_classes: int
    client_state: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
    example_inputs: Mapping[str, torch.Tensor]

    @property
    def z_shape(self) -> tuple[int, ...]:
        """Per-example shape of ``z``."""
        return tuple(self.z_example.shape[1:])

    @classmethod
    def of(cls, model: SplitModel, example_inputs: Mapping[str, torch.Tensor]) -> ModelSpec:
        """The spec of ``model``, learning ``z``'s shape from one example (the model is left unchanged)."""
        with torch.no_grad():
            z = model.smash(dict(example_inputs))["z"]
        layout = {k: (tuple(v.shape), v.dtype) for k, v in model.client_state().items()}
        return cls(z.detach().clone(), model.num_classes, layout, dict(example_inputs))


P = TypeVar("P", bound="Payload")


class Payload:
    """Base of a typed request or reply (subclasses are dataclasses).

    A request sets :attr:`message_type` (``train.<action>`` or ``query.<action>``) and
    :attr:`reply_type`; every payload sets :attr:`categories`, ``record name -> accounting category``
    (the name up to its first ``.``; an undeclared record counts as ``other``).
    """

    message_type: ClassVar[str] = ""
    reply_type: ClassVar[type[Payload] | None] = None
    categories: ClassVar[Mapping[str, str]] = {}
    lie_field: ClassVar[str | None] = None
    """The field a lying node corrupts under fault injection (``faults.*``; ``None``: it does not lie here)."""

    def to_record(self) -> RecordDict:
        raise NotImplementedError

    @classmethod
    def from_record(cls: type[P], content: RecordDict, request: Any = None, spec: ModelSpec | None = None) -> P:
        """Read and validate ``content``; a reply is checked against its ``request`` and ``spec``."""
        raise NotImplementedError


@dataclass
class Reply(Payload):
    """Base of replies: every reply carries the node's compute seconds in its ``meta`` record."""

    compute_seconds: float = field(default=0.0, kw_only=True)

    def meta(self, **values: Any) -> ConfigRecord:
        """The ``meta`` record: ``values`` plus ``compute-seconds``."""
        return ConfigRecord({**values, "compute-seconds": float(self.compute_seconds)})


# --------------------------------------------------------------------------- reading records
def require_record(content: RecordDict, name: str, kind: type) -> Any:
    """``content[name]`` if it is a record of ``kind``, else :class:`ReplyError` ``malformed``."""
    record = content.get(name)
    if not isinstance(record, kind):
        raise ReplyError("malformed", f"missing {name}")
    return record


def require_value(record: ConfigRecord | MetricRecord, key: str, kind: type | tuple[type, ...], what: str = "") -> Any:
    """``record[key]`` if present and of ``kind`` (``int`` never accepts ``bool``), else ``malformed``."""
    if key not in record:
        raise ReplyError("malformed", f"missing {what or key}")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ReplyError("malformed", f"{what or key} is {type(value).__name__}")
    return value


def require_int_list(record: ConfigRecord | MetricRecord, key: str) -> list[int]:
    """``record[key]`` as a list of ints (a single int is a list of one)."""
    value = record.get(key)
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ReplyError("malformed", f"{key} must be a list of integers")
    return [int(v) for v in values]


def compute_seconds(meta: ConfigRecord | MetricRecord) -> float:
    """The ``compute-seconds`` a reply's ``meta`` reports (a finite, non-negative number; 0 when absent)."""
    value = meta.get("compute-seconds", 0.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ReplyError("malformed", "compute-seconds must be a non-negative number")
    return float(value)


def require_scalars(record: ConfigRecord | MetricRecord, key: str, count: int) -> list[float]:
    """Exactly ``count`` finite numbers of sane size under ``record[key]``."""
    value = record.get(key)
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ReplyError("malformed", f"{key} must be a list of numbers")
    if len(values) != count:
        raise ReplyError("wrong-count", f"{len(values)} {key} for {count} expected")
    numbers = [float(v) for v in values]
    if not all(math.isfinite(v) for v in numbers):
        raise ReplyError("non-finite", key)
    if any(abs(v) > VALUE_BOUND for v in numbers):
        raise ReplyError("out-of-range", key)
    return numbers


def require_tensors(content: RecordDict, name: str) -> dict[str, torch.Tensor]:
    """The tensors of array record ``name``, or ``malformed``."""
    record = require_record(content, name, ArrayRecord)
    try:
        return record_to_tensors(record)
    except Exception as error:  # noqa: BLE001 - any decoding failure is a malformed message
        raise ReplyError("malformed", f"{name} does not decode: {error}") from None


def require_finite(tensor: torch.Tensor, what: str) -> None:
    """:class:`ReplyError` unless every value is finite and within :data:`VALUE_BOUND`."""
    if tensor.is_floating_point():
        if not bool(torch.isfinite(tensor).all()):
            raise ReplyError("non-finite", what)
        if tensor.numel() and float(tensor.abs().max()) > VALUE_BOUND:
            raise ReplyError("out-of-range", what)


def check_state(state: Mapping[str, torch.Tensor], layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]], what: str) -> None:
    """:class:`ReplyError` unless ``state`` has exactly ``layout``'s keys, shapes and dtypes and is finite."""
    if set(state) != set(layout):
        raise ReplyError("wrong-shape", f"{what}: keys differ from the model's")
    for key, (shape, dtype) in layout.items():
        value = state[key]
        if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
            raise ReplyError("wrong-shape", f"{what}: {key} is {value.dtype}{tuple(value.shape)}, expected {dtype}{tuple(shape)}")
        require_finite(value, f"{what}: {key}")


def layout_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``name -> (shape, dtype)`` of a state dict (what :func:`check_state` checks against)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


# --------------------------------------------------------------------------- shared pieces
def activation_grad_record(activation_grad: torch.Tensor) -> ArrayRecord:
    """The ``activation-grad`` record: ``λ = ∂loss/∂z`` under ``z``."""
    return tensors_to_record({"z": activation_grad})


def read_activation_grad(content: RecordDict) -> torch.Tensor:
    """``λ`` from a request's ``activation-grad`` record, or ``malformed``."""
    lam = require_tensors(content, "activation-grad").get("z")
    if lam is None:
        raise ReplyError("malformed", "missing activation-grad.z")
    return lam


@dataclass
class SmashedBatch:
    """A smashed minibatch: ``z`` (plus companions such as an attention mask) and its labels."""

    smashed: dict[str, torch.Tensor]
    labels: torch.Tensor

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])

    def records(self, suffix: str = "") -> dict[str, ArrayRecord]:
        """``smashed{suffix}`` and ``labels{suffix}``."""
        return {"smashed" + suffix: tensors_to_record(self.smashed), "labels" + suffix: tensors_to_record({"y": self.labels})}

    @classmethod
    def read(cls, content: RecordDict, spec: ModelSpec | None, suffix: str = "") -> SmashedBatch:
        """Decode and check dtype, shapes (against ``spec``), finiteness and the label range."""
        smashed = require_tensors(content, "smashed" + suffix)
        labels = require_tensors(content, "labels" + suffix).get("y")
        z = smashed.get("z")
        if z is None or labels is None:
            raise ReplyError("malformed", f"missing smashed{suffix}.z or labels{suffix}.y")
        if z.dtype != torch.float32:
            raise ReplyError("wrong-dtype", f"z is {z.dtype}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise ReplyError("wrong-dtype", f"labels are {labels.dtype}")
        if z.dim() == 0 or labels.dim() == 0 or z.shape[0] != labels.shape[0] or labels.shape[0] == 0:
            raise ReplyError("wrong-shape", f"z {tuple(z.shape)} for labels {tuple(labels.shape)}")
        if spec is not None:
            if tuple(z.shape[1:]) != spec.z_shape:
                raise ReplyError("wrong-shape", f"z {tuple(z.shape[1:])}, expected {spec.z_shape}")
            valid = (labels >= 0) | (labels == -100)
            if not bool(valid.all()) or int(labels.max()) >= spec.num_classes:
                raise ReplyError("out-of-range", "labels")
        for key, tensor in smashed.items():
            if tensor.shape[:1] != z.shape[:1]:
                raise ReplyError("wrong-shape", f"{key} {tuple(tensor.shape)}")
            require_finite(tensor, key)
        return cls(smashed, labels.long())


@dataclass
class CatchUp:
    """What brings a node's ``θ_c`` to the server's round: ledger entries after ``from_round``, or
    (weight repair) the whole client state as of ``replacement_round``."""

    from_round: int = 0
    entries: list[LedgerEntry] = field(default_factory=list)
    replacement: dict[str, torch.Tensor] | None = None
    replacement_round: int = 0

    categories: ClassVar[Mapping[str, str]] = {
        "ledger": "seeds_and_ledger_down",
        "client-state": "model_down",
        "sync": "other",
    }

    def records(self) -> dict[str, Any]:
        sync = ConfigRecord({"from-round": self.from_round})
        records: dict[str, Any] = {"sync": sync}
        if self.entries:
            records["ledger"] = ledger_to_record(self.entries)
        if self.replacement is not None:
            records["client-state"] = tensors_to_record(self.replacement)
            sync["replacement-round"] = self.replacement_round
        return records

    @classmethod
    def read(cls, content: RecordDict) -> CatchUp:
        sync = require_record(content, "sync", ConfigRecord)
        ledger = content.get("ledger")
        try:
            entries = record_to_ledger(ledger) if isinstance(ledger, ConfigRecord) else []
        except (KeyError, TypeError, ValueError) as error:
            raise ReplyError("malformed", f"ledger: {error}") from None
        replacement = require_tensors(content, "client-state") if "client-state" in content else None
        replacement_round = int(require_value(sync, "replacement-round", int)) if replacement is not None else 0
        return cls(int(require_value(sync, "from-round", int)), entries, replacement, replacement_round)


@dataclass
class HelloRequest(Payload):
    """``query.hello``: the adapter asks a new node who it is."""

    message_type: ClassVar[str] = "query.hello"

    def to_record(self) -> RecordDict:
        return RecordDict({})

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> HelloRequest:
        return cls()


@dataclass
class HelloReply(Reply):
    """A node's identity: its partition, its number of examples, the round its ``θ_c`` is at."""

    partition_id: int = 0
    num_partitions: int = 1
    num_examples: int = 0
    applied_round: int = 0

    def to_record(self) -> RecordDict:
        info = ConfigRecord(
            {
                "partition-id": self.partition_id,
                "num-partitions": self.num_partitions,
                "num-examples": self.num_examples,
                "applied-round": self.applied_round,
            }
        )
        return RecordDict({"node": info})

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> HelloReply:
        info = require_record(content, "node", ConfigRecord)
        values = {key: int(require_value(info, key, int)) for key in ("partition-id", "num-partitions", "num-examples")}
        reply = cls(values["partition-id"], values["num-partitions"], values["num-examples"], int(info.get("applied-round", 0)))
        if reply.num_examples <= 0 or not 0 <= reply.partition_id < reply.num_partitions:
            raise ReplyError("out-of-range", "node identity")
        return reply


HelloRequest.reply_type = HelloReply


def check_categories(payload: type[Payload]) -> None:
    """``ValueError`` unless every category ``payload`` declares is an accounting category."""
    unknown = sorted(set(payload.categories.values()) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"{payload.__name__} declares unknown accounting categories {unknown}; known: {', '.join(CATEGORIES)}")


def int_list(values: Sequence[int]) -> list[int]:
    return [int(v) for v in values]
