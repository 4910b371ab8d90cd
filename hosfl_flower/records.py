"""Conversions between tensors and Flower records at the message boundary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from .zo import LedgerEntry


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` holding each tensor under its name."""
    return ArrayRecord({name: Array(t.detach().cpu().contiguous().numpy()) for name, t in tensors.items()})


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Tensors back from :func:`tensors_to_record` (writable, owned copies)."""
    return {name: torch.from_numpy(np.array(array.numpy(), copy=True)) for name, array in record.items()}


def ledger_to_record(entries: Sequence[LedgerEntry]) -> ConfigRecord:
    """Ledger entries as flat lists (seeds and scalars of all entries concatenated)."""
    return ConfigRecord(
        {
            "rounds": [e.round for e in entries],
            "counts": [len(e.seeds) for e in entries],
            "seeds": [s for e in entries for s in e.seeds],
            "scalars": [float(v) for e in entries for v in e.scalars],
            "lr": [float(e.lr) for e in entries],
            "mu": [float(e.mu) for e in entries],
        }
    )


def record_to_ledger(record: ConfigRecord) -> list[LedgerEntry]:
    """Ledger entries back from :func:`ledger_to_record`; raises ``ValueError`` on inconsistent lengths."""
    rounds, counts = list(record["rounds"]), list(record["counts"])
    seeds, scalars = list(record["seeds"]), list(record["scalars"])
    lrs, mus = list(record["lr"]), list(record["mu"])
    if not len(rounds) == len(counts) == len(lrs) == len(mus) or sum(counts) != len(seeds) or len(seeds) != len(scalars):
        raise ValueError("malformed ledger record: list lengths disagree")
    entries, offset = [], 0
    for rnd, count, lr, mu in zip(rounds, counts, lrs, mus):
        entries.append(
            LedgerEntry(int(rnd), tuple(int(s) for s in seeds[offset : offset + count]),
                        tuple(float(v) for v in scalars[offset : offset + count]), float(lr), float(mu))
        )
        offset += count
    return entries
