"""Atomic, verified checkpoints of a run's server-side state (docs/protocols.md, "Checkpoints": the ledger is part of it).

A checkpoint file is a header line, the SHA-256 and length of the payload, then the payload (a
``torch.save`` of the round, the run config and the strategy's state, loaded back with
``weights_only=True``). It is written to a temporary file in the same directory, flushed to disk
and renamed over the previous one, so a crash leaves either the old or the new checkpoint, never a
mix. Loading verifies length and digest before unpickling anything and checks that the checkpoint
was written by the same run configuration; any doubt raises :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

MAGIC = b"HOSFL-FLOWER-CHECKPOINT 1\n"
FILE_NAME = "checkpoint.pt"

RESUMABLE_KEYS = frozenset(
    {
        "num-server-rounds",
        "checkpoint-every",
        "checkpoint-dir",
        "resume",
        "results-dir",
        "round-timeout",
        "eval-every",
        "eval-batch-size",
        "final-sync",
        "min-nodes",
        "max-skipped-rounds",
        "split-server.placement",
    }
)
"""Run-config keys a resumed run may change; every other key must equal the checkpoint's."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated, or belongs to a different run."""


def checkpoint_path(directory: str | Path) -> Path:
    """The checkpoint file inside ``directory``."""
    return Path(directory) / FILE_NAME


def save_checkpoint(directory: str | Path, server_round: int, config: Mapping[str, Any], state: Mapping[str, Any]) -> Path:
    """Write the checkpoint of ``server_round`` atomically; return its path."""
    buffer = io.BytesIO()
    torch.save({"round": int(server_round), "config": dict(config), "state": dict(state)}, buffer)
    payload = buffer.getvalue()
    header = MAGIC + f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()
    target = checkpoint_path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".checkpoint-", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(header)
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def read_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint: ``{"round", "config", "state"}``; raise :class:`CheckpointError`."""
    path = checkpoint_path(directory)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist")
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a hosfl-flower checkpoint (bad header)")
    line_end = data.find(b"\n", len(MAGIC))
    try:
        digest, length_text = data[len(MAGIC) : line_end].decode().split()
        length = int(length_text)
    except ValueError:
        raise CheckpointError(f"{path} is corrupt (unreadable header)") from None
    payload = data[line_end + 1 :]
    if len(payload) != length:
        raise CheckpointError(f"{path} is truncated or corrupt: payload of {len(payload)} bytes, expected {length}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path} is corrupt: its SHA-256 does not match")
    try:
        content = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file cannot be trusted
        raise CheckpointError(f"{path} does not load: {error}") from None
    if not isinstance(content, dict) or not {"round", "config", "state"} <= set(content):
        raise CheckpointError(f"{path} lacks round, config or state")
    return content


def check_same_run(
    path: str | Path, saved: Mapping[str, Any], config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> None:
    """Raise :class:`CheckpointError` naming every key (outside :data:`RESUMABLE_KEYS`) that differs.

    A key only one side has (a protocol registered in one process and not the other) counts as its
    default in ``defaults``.
    """
    defaults = defaults or {}
    keys = sorted((set(saved) | set(config)) - RESUMABLE_KEYS)
    differing = [key for key in keys if saved.get(key, defaults.get(key)) != config.get(key, defaults.get(key))]
    if differing:
        shown = ", ".join(f"{key}={saved.get(key)!r} there, {config.get(key)!r} here" for key in differing[:4])
        more = f" (and {len(differing) - 4} more)" if len(differing) > 4 else ""
        raise CheckpointError(f"checkpoint {path} belongs to a different run: {shown}{more}")


def check_tensors(what: str, saved: Mapping[str, Any], current: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` unless ``saved`` has exactly ``current``'s keys, shapes and dtypes."""
    if not isinstance(saved, Mapping) or set(saved) != set(current):
        missing = sorted(set(current) - set(saved or {}))[:3]
        extra = sorted(set(saved or {}) - set(current))[:3]
        raise CheckpointError(f"checkpoint's {what} does not fit this model (missing {missing}, unexpected {extra})")
    for key, tensor in current.items():
        value = saved[key]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape or value.dtype != tensor.dtype:
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"checkpoint's {what}.{key} is {got}, this model has {tuple(tensor.shape)} {tensor.dtype}")
