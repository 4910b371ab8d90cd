"""Where a node keeps its client weights between messages: not in the message ``Context``.

The node's ``context.state`` names the version it is at, ``(applied round, fingerprint of θ_c)``; the
tensors of that version are kept here, in the process (shared by every node of the process: nodes
that applied the same rounds hold bit-identical weights) and in a file per node on the node's disk
(a ClientApp process may not outlive a message, and the simulation engine may run a node's next
message in another process). The ledger stays the source of truth: a version found nowhere, or a
file whose weights do not hash to the fingerprint it claims, is a miss, and the node rebuilds by
replay or asks for a weight repair; it never adopts weights it cannot verify.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from ..models import SplitModel
from ..zo import fingerprint

WeightTag = tuple[int, str]
"""``(applied round, fingerprint of θ_c)``: names one version of the client weights exactly."""

OPTIMIZER_PREFIX = "optimizer."
"""Prefix of the client optimizer's tensors in a stored version (and in a weight repair)."""


def default_store_dir() -> Path:
    """``$HOSFL_FLOWER_NODE_STORE``, else ``hosfl-flower-nodes`` in the system's temporary directory."""
    return Path(os.environ.get("HOSFL_FLOWER_NODE_STORE") or Path(tempfile.gettempdir()) / "hosfl-flower-nodes")


def weights_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The client-segment tensors of a stored version (without the optimizer's)."""
    return {k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER_PREFIX)}


def optimizer_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The optimizer tensors of a stored version, without their prefix."""
    return {k[len(OPTIMIZER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(OPTIMIZER_PREFIX)}


class WeightStore:
    """Versions of ``θ_c`` (with the client optimizer's state) by run, node and :data:`WeightTag`.

    Each node's latest version is kept durably: in a file per node under ``directory``, or with
    ``directory=None`` in memory (the in-process reference loop). A process-wide cache of the
    ``memory_versions`` most recent versions saves reading them back. ``holds`` /
    ``mark`` remember which version a shared model's parameters hold, so a node whose version is
    already loaded skips the copy: each parameter's in-place version counter and storage are
    recorded, so any later change of the parameters makes the check fail.
    """

    def __init__(self, directory: Path | None = None, memory_versions: int = 3) -> None:
        self.directory = directory
        self.memory_versions = memory_versions
        self._memory: OrderedDict[tuple[str, WeightTag], dict[str, torch.Tensor]] = OrderedDict()
        self._durable: dict[tuple[str, int], tuple[WeightTag, dict[str, torch.Tensor]]] = {}
        self._held: weakref.WeakKeyDictionary[SplitModel, tuple[WeightTag, tuple]] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ versions
    def get(self, run_id: str, node_id: int, tag: WeightTag) -> dict[str, torch.Tensor] | None:
        """The tensors of version ``tag`` (the caller must not modify them), or ``None``."""
        key = (run_id, tag)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._path(run_id, node_id)
        if path is None:
            kept = self._durable.get((run_id, node_id))
            return kept[1] if kept is not None and kept[0] == tag else None
        if not path.exists():
            return None
        try:
            saved = torch.load(path, weights_only=True)
            tensors = dict(saved["tensors"])
            stored_tag = (int(saved["round"]), str(saved["fingerprint"]))
        except Exception:  # noqa: BLE001 - an unreadable file is a miss
            return None
        if stored_tag != tag or fingerprint(weights_of(tensors).values()) != tag[1]:
            return None
        self._remember(key, tensors)
        return tensors

    def put(self, run_id: str, node_id: int, tag: WeightTag, tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep ``tensors`` (copied) as node ``node_id``'s version ``tag``."""
        copies = {k: v.detach().clone() for k, v in tensors.items()}
        self._remember((run_id, tag), copies)
        path = self._path(run_id, node_id)
        if path is None:
            self._durable[(run_id, node_id)] = (tag, copies)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            torch.save({"round": tag[0], "fingerprint": tag[1], "tensors": copies}, partial)
            os.replace(partial, path)

    def clear(self) -> None:
        """Forget what this process keeps (files stay)."""
        self._memory.clear()
        self._durable.clear()
        self._held = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ what a shared model holds
    @staticmethod
    def _stamp(model: SplitModel) -> tuple:
        return tuple((id(p), p.data_ptr(), p._version) for p in model.client_parameters())

    def holds(self, model: SplitModel, tag: WeightTag | None) -> bool:
        """Whether ``model`` holds exactly version ``tag`` right now."""
        held = self._held.get(model)
        return tag is not None and held is not None and held[0] == tag and held[1] == self._stamp(model)

    def mark(self, model: SplitModel, tag: WeightTag | None) -> None:
        """Record that ``model`` now holds version ``tag`` (``None``: nothing known)."""
        if tag is None:
            self._held.pop(model, None)
        else:
            self._held[model] = (tag, self._stamp(model))

    # ------------------------------------------------------------------ internals
    def _remember(self, key: tuple[str, WeightTag], tensors: dict[str, torch.Tensor]) -> None:
        self._memory[key] = tensors
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_versions:
            self._memory.popitem(last=False)

    def _path(self, run_id: str, node_id: int) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"run-{run_id}" / f"node-{node_id}.pt"


NODE_STORE = WeightStore(default_store_dir())
"""The store of the Flower ClientApp's nodes in this process."""
