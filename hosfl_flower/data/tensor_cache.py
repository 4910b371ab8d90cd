"""The bundled digits' examples as tensors on disk, so that a process loads them without importing
``datasets``, ``flwr-datasets`` (with its plotting stack) and scikit-learn: about 2.5 s of every
process's start on a CPU core, paid by each Ray actor of a simulation and by each message of a
deployment, whose SuperNodes start a ClientApp process per message.

The first process that splits or partitions the digits writes what it built (the held-out evaluation
examples; every partition of a partitioning), the others read it. A file is named by a hash of
everything that decides its contents, the versions of the libraries that computed them included, and
is written atomically; an unreadable or foreign file is a miss. The tensors are exactly those the
libraries produce, so a hit changes no bit of a run. ``HOSFL_FLOWER_DATA_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from .examples import Examples

CACHE_FORMAT = 1
"""Version of the files' layout and of what the package computes into them."""

SWITCH_ENV = "HOSFL_FLOWER_DATA_CACHE"
"""``0`` turns the cache off (nothing read, nothing written)."""

_LIBRARIES = ("datasets", "flwr-datasets", "numpy", "scikit-learn", "torch")


def enabled() -> bool:
    """Whether the cache is on (``HOSFL_FLOWER_DATA_CACHE`` is not ``0``)."""
    return os.environ.get(SWITCH_ENV, "1") != "0"


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


def cache_path(kind: str, **identity: Any) -> Path:
    """The file of ``kind`` (``held-out`` or ``partitions``) for ``identity``, the values that decide it."""
    from ..pretrain import default_cache_dir

    described = {"format": CACHE_FORMAT, "kind": kind, "libraries": _library_versions(), **identity}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode()).hexdigest()[:32]
    return default_cache_dir() / "data" / f"digits-{kind}-{digest}.pt"


def _to_tensors(examples: Examples) -> dict[str, torch.Tensor]:
    return {**{f"inputs.{k}": v for k, v in examples.inputs.items()}, "labels": examples.labels}


def _from_tensors(tensors: dict[str, torch.Tensor]) -> Examples:
    inputs = {k.removeprefix("inputs."): v for k, v in tensors.items() if k.startswith("inputs.")}
    return Examples(inputs, tensors["labels"])


def load(path: Path) -> list[Examples] | None:
    """The examples stored at ``path``, or ``None`` (cache off, no file, or one that does not read back)."""
    if not enabled() or not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return [_from_tensors(tensors) for tensors in stored["examples"]]
    except Exception:  # a truncated or foreign file is a miss, never an error
        return None


def save(path: Path, examples: list[Examples]) -> None:
    """Store ``examples`` at ``path`` atomically; a cache that cannot be written is skipped silently."""
    if not enabled():
        return
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(handle, "wb") as file:
            torch.save({"examples": [_to_tensors(e) for e in examples]}, file)
        os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
