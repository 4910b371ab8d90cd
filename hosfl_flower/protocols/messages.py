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
MAX_INT = 2**53
"""Largest integer field a message may carry (counts, rounds, steps, partitions; seeds: :data:`MAX_SEED`)."""
MAX_SEED = 2**63 - 1
"""Largest seed a request may carry (the server draws them below ``2**62``)."""
MAX_COMPUTE_SECONDS = 86400.0
"""Largest ``compute-seconds`` a reply may report (one day)."""
MAX_STRING = 256
"""Longest string field a message may carry (fingerprints, names)."""
MAX_LIST = 1 << 20
"""Longest list of numbers a message may carry."""
TENSOR_DTYPES = frozenset(
    (torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)
)
"""The dtypes a message's tensors may have (others, e.g. complex or unsigned wide integers, are ``wrong-dtype``)."""
IGNORE_INDEX = -100
"""The label of a position the loss ignores (sequence labels only, e.g. padding of ``causal-lm``)."""


class ReplyError(Exception):
    """A message failed validation; ``reason`` is the short name it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ModelSpec:
    """What replies are checked against: one example's ``z``, the classes, the client segment's layout,
    and (from :meth:`of`) the per-example shape and dtype of every smashed tensor and of the labels."""

    z_example: torch.Tensor
    num_classes: int
    client_state: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
    example_inputs: Mapping[str, torch.Tensor]
    label_shape: tuple[int, ...] | None = None
    """Per-example shape of the labels: ``()`` for a class per example, ``(T,)`` for token labels (``None``: unchecked)."""
    smashed_layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None
    """``name -> (per-example shape, dtype)`` of what ``smash`` returns (``z`` and its companions; ``None``: unchecked)."""

    @property
    def z_shape(self) -> tuple[int, ...]:
        """Per-example shape of ``z``."""
        return tuple(self.z_example.shape[1:])

    @classmethod
    def of(
        cls, model: SplitModel, example_inputs: Mapping[str, torch.Tensor], example_labels: torch.Tensor | None = None
    ) -> ModelSpec:
        """The spec of ``model``, learning the smashed tensors' shapes from one example (the model is left
        unchanged). The labels' per-example shape comes from ``example_labels`` (one example's labels, as
        the task builds them), or without them from the logits (``head`` in eval mode: labels are shaped
        like the logits without their class dimension)."""
        with torch.no_grad():
            smashed = model.smash(dict(example_inputs))
            if example_labels is not None:
                label_shape = tuple(example_labels.shape[1:])
            else:
                modes = [(module, module.training) for module in model.modules()]
                model.eval()
                try:
                    label_shape = tuple(model.head(smashed).shape[1:-1])
                finally:
                    for module, training in modes:
                        module.training = training
        z = smashed["z"]
        layout = {k: (tuple(v.shape), v.dtype) for k, v in model.client_state().items()}
        smashed_layout = {k: (tuple(v.shape[1:]), v.dtype) for k, v in smashed.items()}
        return cls(z.detach().clone(), model.num_classes, layout, dict(example_inputs), label_shape, smashed_layout)


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
    attack_fields: ClassVar[tuple[str, ...]] = ()
    """The fields a byzantine node falsifies under ``faults.byzantine-*``: what the server aggregates."""

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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(value: int | float) -> float:
    """``float(value)``; an int too large for a float becomes ``inf`` (instead of raising ``OverflowError``)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def require_int(
    record: ConfigRecord | MetricRecord, key: str, minimum: int = 0, maximum: int = MAX_INT, default: int | None = None
) -> int:
    """``record[key]``: an integer (never a ``bool``) in ``[minimum, maximum]`` (``out-of-range``
    otherwise); ``default`` when absent, or ``malformed`` without one."""
    if key not in record and default is not None:
        return default
    value = int(require_value(record, key, int))
    if not minimum <= value <= maximum:
        raise ReplyError("out-of-range", f"{key}={value} is outside [{minimum}, {maximum}]")
    return value


def require_number(
    record: ConfigRecord | MetricRecord,
    key: str,
    minimum: float = -VALUE_BOUND,
    maximum: float = VALUE_BOUND,
    positive: bool = False,
    default: float | None = None,
) -> float:
    """``record[key]``: a finite number (an ``int`` or ``float``, never a ``bool``) in ``[minimum, maximum]``
    (and ``> 0`` if ``positive``); ``default`` when absent, or ``malformed`` without one."""
    if key not in record and default is not None:
        return default
    value = _as_float(require_value(record, key, (int, float)))
    if not math.isfinite(value):
        raise ReplyError("non-finite" if isinstance(record[key], float) else "out-of-range", key)
    if not minimum <= value <= maximum or (positive and value <= 0):
        raise ReplyError("out-of-range", f"{key}={value}")
    return value


def require_str(
    record: ConfigRecord | MetricRecord,
    key: str,
    choices: Sequence[str] | None = None,
    default: str | None = None,
    max_length: int = MAX_STRING,
) -> str:
    """``record[key]``: a string of at most ``max_length`` characters (one of ``choices`` if given);
    ``default`` when absent, or ``malformed`` without one."""
    if key not in record and default is not None:
        return default
    value = str(require_value(record, key, str))
    if len(value) > max_length:
        raise ReplyError("out-of-range", f"{key} is longer than {max_length} characters")
    if choices is not None and value not in choices:
        raise ReplyError("out-of-range", f"{key}={value[:40]!r}; allowed: {', '.join(choices)}")
    return value


def require_int_list(
    record: ConfigRecord | MetricRecord, key: str, minimum: int = 0, maximum: int = MAX_INT, max_length: int = MAX_LIST
) -> list[int]:
    """``record[key]`` as a list of ints in ``[minimum, maximum]`` (a single int is a list of one)."""
    value: Any = record.get(key)
    values: list[Any] = [value] if _is_int(value) else value
    if not isinstance(values, list) or not all(_is_int(v) for v in values):
        raise ReplyError("malformed", f"{key} must be a list of integers")
    if len(values) > max_length:
        raise ReplyError("wrong-count", f"{len(values)} {key}, at most {max_length}")
    if not all(minimum <= v <= maximum for v in values):
        raise ReplyError("out-of-range", f"{key} outside [{minimum}, {maximum}]")
    return [int(v) for v in values]


def compute_seconds(meta: ConfigRecord | MetricRecord) -> float:
    """The ``compute-seconds`` a reply's ``meta`` reports (a finite number in ``[0, 86400]``; 0 when absent)."""
    value = meta.get("compute-seconds", 0.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ReplyError("malformed", "compute-seconds must be a number")
    value = _as_float(value)
    if not math.isfinite(value):
        raise ReplyError("non-finite", "compute-seconds")
    if not 0 <= value <= MAX_COMPUTE_SECONDS:
        raise ReplyError("out-of-range", f"compute-seconds={value} is outside [0, {MAX_COMPUTE_SECONDS:g}]")
    return float(value)


def require_scalars(record: ConfigRecord | MetricRecord, key: str, count: int) -> list[float]:
    """Exactly ``count`` finite numbers of sane size under ``record[key]``."""
    value: Any = record.get(key)
    values: list[Any] = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ReplyError("malformed", f"{key} must be a list of numbers")
    if len(values) != count:
        raise ReplyError("wrong-count", f"{len(values)} {key} for {count} expected")
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise ReplyError("non-finite", key)
    numbers = [_as_float(v) for v in values]
    if any(abs(v) > VALUE_BOUND for v in numbers):
        raise ReplyError("out-of-range", key)
    return numbers


def require_tensors(content: RecordDict, name: str, finite: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of array record ``name``, or ``malformed`` (``finite``: and each passes :func:`require_finite`)."""
    record = require_record(content, name, ArrayRecord)
    try:
        tensors = record_to_tensors(record)
    except Exception as error:  # noqa: BLE001 - any decoding failure is a malformed message
        raise ReplyError("malformed", f"{name} does not decode: {error}") from None
    for key, tensor in tensors.items():
        if tensor.dtype not in TENSOR_DTYPES:
            raise ReplyError("wrong-dtype", f"{name}.{key} is {tensor.dtype}")
    if finite:
        for key, tensor in tensors.items():
            require_finite(tensor, f"{name}.{key}")
    return tensors


def require_finite(tensor: torch.Tensor, what: str) -> None:
    """:class:`ReplyError` unless every value is finite and within :data:`VALUE_BOUND` (integers too)."""
    if not tensor.numel() or tensor.dtype == torch.bool:
        return
    if tensor.is_floating_point():
        if not bool(torch.isfinite(tensor).all()):
            raise ReplyError("non-finite", what)
        if float(tensor.abs().max()) > VALUE_BOUND:
            raise ReplyError("out-of-range", what)
    elif int(tensor.min()) < -VALUE_BOUND or int(tensor.max()) > VALUE_BOUND:
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
    """``λ`` from a request's ``activation-grad`` record (float32, finite), or :class:`ReplyError`."""
    lam = require_tensors(content, "activation-grad", finite=True).get("z")
    if lam is None:
        raise ReplyError("malformed", "missing activation-grad.z")
    if lam.dtype != torch.float32:
        raise ReplyError("wrong-dtype", f"activation-grad is {lam.dtype}")
    if lam.dim() == 0 or lam.shape[0] == 0:
        raise ReplyError("wrong-shape", f"activation-grad {tuple(lam.shape)}")
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
    def read(cls, content: RecordDict, spec: ModelSpec | None, suffix: str = "", extra: Sequence[str] = ()) -> SmashedBatch:
        """Decode and check dtypes, shapes (against ``spec``: exactly its smashed tensors plus ``extra``,
        each shaped like ``z``), finiteness and the labels' shape and range."""
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
        for key, tensor in smashed.items():
            if tensor.shape[:1] != z.shape[:1]:
                raise ReplyError("wrong-shape", f"{key} {tuple(tensor.shape)}")
        if spec is not None:
            cls._check_layout(smashed, spec, suffix, extra)
            cls._check_labels(labels, spec)
        for key, tensor in smashed.items():
            require_finite(tensor, key)
        return cls(smashed, labels.long())

    @staticmethod
    def _check_layout(smashed: Mapping[str, torch.Tensor], spec: ModelSpec, suffix: str, extra: Sequence[str]) -> None:
        layout = dict(spec.smashed_layout or {"z": (spec.z_shape, spec.z_example.dtype)})
        layout.update({name: layout["z"] for name in extra})
        if spec.smashed_layout is None:  # companions unknown: only z (and the extras) are checked
            layout.update({k: (tuple(v.shape[1:]), v.dtype) for k, v in smashed.items() if k not in layout})
        if set(smashed) != set(layout):
            raise ReplyError("wrong-shape", f"smashed{suffix} holds {sorted(smashed)[:8]}, expected {sorted(layout)[:8]}")
        for key, (shape, dtype) in layout.items():
            tensor = smashed[key]
            if tuple(tensor.shape[1:]) != tuple(shape):
                raise ReplyError("wrong-shape", f"{key} {tuple(tensor.shape[1:])} per example, expected {tuple(shape)}")
            if tensor.dtype != dtype:
                raise ReplyError("wrong-dtype", f"{key} is {tensor.dtype}, expected {dtype}")

    @staticmethod
    def _check_labels(labels: torch.Tensor, spec: ModelSpec) -> None:
        """Shape ``(B, *label_shape)``; values are classes (sequence labels: or :data:`IGNORE_INDEX`, not all)."""
        if spec.label_shape is not None and tuple(labels.shape[1:]) != tuple(spec.label_shape):
            raise ReplyError("wrong-shape", f"labels {tuple(labels.shape[1:])} per example, expected {tuple(spec.label_shape)}")
        sequence = spec.label_shape is None or len(spec.label_shape) > 0
        ignored = labels == IGNORE_INDEX if sequence else torch.zeros_like(labels, dtype=torch.bool)
        valid = ((labels >= 0) & (labels < spec.num_classes)) | ignored
        if not bool(valid.all()):
            raise ReplyError("out-of-range", "labels outside the classes")
        if bool(ignored.all()):
            raise ReplyError("out-of-range", "every label is ignored")


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
        entries = []
        if "ledger" in content:
            try:
                entries = record_to_ledger(require_record(content, "ledger", ConfigRecord))
            except (KeyError, TypeError, ValueError, OverflowError) as error:
                raise ReplyError("malformed", f"ledger: {error}") from None
            for entry in entries:
                if any(abs(v) > VALUE_BOUND for v in (*entry.scalars, entry.lr, entry.mu)):
                    raise ReplyError("out-of-range", f"ledger entry of round {entry.round}")
        replacement = require_tensors(content, "client-state", finite=True) if "client-state" in content else None
        replacement_round = require_int(sync, "replacement-round") if replacement is not None else 0
        return cls(require_int(sync, "from-round"), entries, replacement, replacement_round)


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
        """``partition-id`` in ``[0, num-partitions)``, ``num-examples >= 1``, ``applied-round >= 0``."""
        info = require_record(content, "node", ConfigRecord)
        num_partitions = require_int(info, "num-partitions", minimum=1)
        partition_id = require_int(info, "partition-id", maximum=num_partitions - 1)
        num_examples = require_int(info, "num-examples", minimum=1)
        applied_round = require_int(info, "applied-round")
        return cls(partition_id, num_partitions, num_examples, applied_round, compute_seconds=compute_seconds(info))


HelloRequest.reply_type = HelloReply


def check_categories(payload: type[Payload]) -> None:
    """``ValueError`` unless every category ``payload`` declares is an accounting category."""
    unknown = sorted(set(payload.categories.values()) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"{payload.__name__} declares unknown accounting categories {unknown}; known: {', '.join(CATEGORIES)}")


def int_list(values: Sequence[int]) -> list[int]:
    return [int(v) for v in values]
