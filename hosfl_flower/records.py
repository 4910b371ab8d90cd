"""Conversions between tensors and Flower records at the message boundary."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from .zo import DIRECTIONS_CONTRACT, LedgerEntry, check_contract

# Records are written and read on every message (node state, activations, gradients), so they are
# encoded and decoded here without Flower's general path (``np.save``/``np.load`` through a file
# object for every array). The bytes are the same ``.npy`` format Flower writes (``Array.numpy()``
# reads them); only the header of each (dtype, shape) is computed once by ``np.save`` and reused.
_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}
_NPY_LAYOUTS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}
_NPY_CACHE_LIMIT = 4096
_NPY_STYPE = Array(np.zeros(1, dtype=np.float32)).stype


def _encode_array(tensor: torch.Tensor) -> Array:
    values = tensor.detach().cpu().contiguous().numpy()
    key = (values.dtype.str, tuple(values.shape))
    header = _NPY_HEADERS.get(key)
    if header is None:
        array = Array(values)  # Flower's own encoding; remember its header
        if len(_NPY_HEADERS) < _NPY_CACHE_LIMIT:
            _NPY_HEADERS[key] = array.data[: len(array.data) - values.nbytes]
        return array
    return Array(dtype=str(values.dtype), shape=key[1], stype=_NPY_STYPE, data=b"".join((header, values.data)))


def _decode_array(array: Array) -> np.ndarray:
    """A writable, C-contiguous array the caller owns."""
    data = array.data
    offset = None
    if array.stype == _NPY_STYPE and data[:6] == b"\x93NUMPY" and len(data) > 12:
        if data[6] == 1:
            offset = 10 + int.from_bytes(data[8:10], "little")
        elif data[6] in (2, 3):
            offset = 12 + int.from_bytes(data[8:12], "little")
    if offset is not None:
        layout = _NPY_LAYOUTS.get(data[:offset])
        if layout is not None:  # the same header bytes always describe the same dtype, shape and order
            dtype, shape = layout
            count = int(np.prod(shape, dtype=np.int64))
            return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape).copy()
    values = array.numpy()
    if offset is not None and values.flags.c_contiguous and len(_NPY_LAYOUTS) < _NPY_CACHE_LIMIT:
        _NPY_LAYOUTS[data[:offset]] = (values.dtype, tuple(values.shape))
    if not values.flags.writeable or not values.flags.c_contiguous:
        values = np.array(values, copy=True, order="C")
    return values


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` holding each tensor under its name (the ``.npy`` bytes Flower itself writes)."""
    return ArrayRecord({name: _encode_array(t) for name, t in tensors.items()})


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Tensors back from an ``ArrayRecord`` (one writable, owned copy each)."""
    return {name: torch.from_numpy(_decode_array(array)) for name, array in record.items()}


def ledger_to_record(entries: Sequence[LedgerEntry]) -> ConfigRecord:
    """Ledger entries as flat lists (seeds and scalars of all entries concatenated).

    The per-entry ``directions`` list is written only when some entry's directions are not gaussian;
    a record without it is all gaussian (so gaussian ledgers keep their size). ``contract`` names the
    determinism contract the seeds' directions are drawn under (:data:`~hosfl_flower.zo.DIRECTIONS_CONTRACT`).
    """
    record = ConfigRecord(
        {
            "contract": DIRECTIONS_CONTRACT,
            "rounds": [e.round for e in entries],
            "counts": [len(e.seeds) for e in entries],
            "seeds": [s for e in entries for s in e.seeds],
            "scalars": [float(v) for e in entries for v in e.scalars],
            "lr": [float(e.lr) for e in entries],
            "mu": [float(e.mu) for e in entries],
        }
    )
    if any(e.directions != "gaussian" for e in entries):
        record["directions"] = [e.directions for e in entries]
    return record


_MAX_ROUND = 2**53
_MAX_SEED = 2**63 - 1


def _values(record: ConfigRecord, key: str, kind: type | tuple[type, ...]) -> list[Any]:
    """A list entry of ``record`` (what :func:`ledger_to_record` writes), copied; every item of ``kind``
    (never a ``bool``); ``ValueError`` otherwise."""
    if key not in record:
        raise ValueError(f"malformed ledger record: missing {key}")
    values = record[key]
    if not isinstance(values, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise ValueError(f"malformed ledger record: {key} must be a list of {getattr(kind, '__name__', 'numbers')}")
    return list(cast(list[Any], values))


def _in_range(key: str, values: Sequence[int], low: int, high: int) -> None:
    if not all(low <= v <= high for v in values):
        raise ValueError(f"malformed ledger record: {key} outside [{low}, {high}]")


def _finite(key: str, values: Sequence[int | float], positive: bool = False) -> list[float]:
    try:
        numbers = [float(v) for v in values]
    except OverflowError:
        raise ValueError(f"malformed ledger record: {key} out of range") from None
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in numbers):
        raise ValueError(f"malformed ledger record: {key} must be finite{' and positive' if positive else ''}")
    return numbers


def record_to_ledger(record: ConfigRecord) -> list[LedgerEntry]:
    """Ledger entries back from :func:`ledger_to_record`; raises ``ValueError`` on anything else: a missing
    or mistyped list, inconsistent lengths, a negative or huge round, count or seed, a scalar or rate that
    is not finite, a ``mu`` that is not positive, an unknown direction distribution, or another directions
    contract than this version's (a record without one is of contract 1)."""
    check_contract(record.get("contract"), "the ledger record")
    rounds, counts = _values(record, "rounds", int), _values(record, "counts", int)
    seeds = _values(record, "seeds", int)
    scalars = _finite("scalars", _values(record, "scalars", (int, float)))
    lrs = _finite("lr", _values(record, "lr", (int, float)))
    mus = _finite("mu", _values(record, "mu", (int, float)), positive=True)
    directions = _values(record, "directions", str) if "directions" in record else ["gaussian"] * len(rounds)
    _in_range("rounds", rounds, 0, _MAX_ROUND)
    _in_range("counts", counts, 0, len(seeds))
    _in_range("seeds", seeds, 0, _MAX_SEED)
    if (
        not len(rounds) == len(counts) == len(lrs) == len(mus) == len(directions)
        or sum(counts) != len(seeds)
        or len(seeds) != len(scalars)
    ):
        raise ValueError("malformed ledger record: list lengths disagree")
    entries, offset = [], 0
    for rnd, count, lr, mu, kind in zip(rounds, counts, lrs, mus, directions):
        entries.append(
            LedgerEntry(
                int(rnd),
                tuple(int(s) for s in seeds[offset : offset + count]),
                tuple(scalars[offset : offset + count]),
                lr,
                mu,
                str(kind),
            )
        )
        offset += count
    return entries
