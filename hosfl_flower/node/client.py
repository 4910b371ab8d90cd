"""``HOSFLClient``: a node — its model, data partition, settings and weight versions — as a Flower
``NumPyClient``.

Each protocol's client part (``hosfl_flower/protocols/<name>/client.py``) is a set of handlers that
take this object and a typed request; :meth:`HOSFLClient.handle` dispatches to them, so a subclass can
change what a node does (how it draws its batches, how it restores weights, or a handler itself) and
``build_client_app(client_class=...)`` runs the subclass on every node. ``get_parameters`` / ``fit`` /
``evaluate`` keep their NumPyClient meaning (whole-model first-order training, used by FedAvg).

The object is rebuilt for every message. What the node must remember lives in ``context.state``
(:attr:`state`): the version of ``θ_c`` it is at and small per-round scratch; the weights themselves
are in a :class:`~hosfl_flower.node.store.WeightStore`.

With ``client.device`` other than the CPU, the node computes on a :class:`DeviceCopy` of its model:
``θ_c`` stays float32 on the CPU (every update of it is computed there, as on a CPU node), and the
forward passes run on the copy, refreshed from it (docs/protocols.md, "Devices").
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, overload

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.client import NumPyClient

from ..data import Examples, sample_batch
from ..devices import segment_copy
from ..evaluation import evaluate_model
from ..models import SplitModel
from ..models.base import Inputs, Smashed
from ..protocols.messages import CatchUp, Payload
from ..records import record_to_tensors, tensors_to_record
from ..zo import ClientOptimizer, fingerprint, make_client_optimizer, probe_scalars, replay
from .store import NODE_STORE, OPTIMIZER_PREFIX, WeightStore, WeightTag, optimizer_of, weights_of

STATE_SYNC = "hosfl.sync"
SCRATCH_PREFIX = "hosfl.scratch."


class OutOfSyncError(RuntimeError):
    """The node cannot serve a request (it lacks the batch or weights the request assumes)."""


def _state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


class DeviceCopy:
    """A working copy of a model on ``device`` that mirrors the model's client segment (or, ``whole``,
    all of it); the model itself stays the canonical replica.

    :meth:`pull` copies into the copy every canonical tensor that changed since the last transfer (each
    tensor's storage and in-place version counter tell), so a probe that perturbs ``θ_c`` in place costs
    one host-to-device copy of ``θ_c`` and frozen weights cross once. :meth:`push` copies the copy back
    after it was trained. :attr:`bytes_to_device` and :attr:`bytes_from_device` count what crossed.
    """

    def __init__(self, model: SplitModel, device: torch.device, whole: bool = False) -> None:
        self.device = device
        self.model: SplitModel = copy.deepcopy(model).to(device) if whole else segment_copy(model, "client", device)
        source, target = (model, self.model) if whole else (model.client, self.model.client)
        self._pairs = list(zip(_state_tensors(source), _state_tensors(target)))
        self._stamps: list[tuple[int, int, int] | None] = [None] * len(self._pairs)
        self.bytes_to_device = 0
        self.bytes_from_device = 0

    @staticmethod
    def _stamp(source: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int]:
        return source.data_ptr(), source._version, target._version

    @torch.no_grad()
    def pull(self) -> SplitModel:
        """Refresh the copy from the canonical tensors that changed; returns the copy."""
        for index, (source, target) in enumerate(self._pairs):
            if self._stamps[index] != self._stamp(source, target):
                target.copy_(source)
                self.bytes_to_device += source.numel() * source.element_size()
                self._stamps[index] = self._stamp(source, target)
        return self.model

    @torch.no_grad()
    def push(self) -> None:
        """Copy the tensors the copy changed back into the canonical model."""
        for index, (source, target) in enumerate(self._pairs):
            if self._stamps[index] != self._stamp(source, target):
                source.copy_(target)
                self.bytes_from_device += target.numel() * target.element_size()
                self._stamps[index] = self._stamp(source, target)

    def to_device(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` on the copy's device."""
        return {k: v.to(self.device) for k, v in tensors.items()}


_DEVICE_COPIES: weakref.WeakKeyDictionary[SplitModel, dict[tuple[str, bool], DeviceCopy]] = weakref.WeakKeyDictionary()
"""The device copies of each (shared) model of this process, by device and ``whole``."""


def device_copy(model: SplitModel, device: torch.device, whole: bool = False) -> DeviceCopy:
    """This process's :class:`DeviceCopy` of ``model`` on ``device`` (built on first use)."""
    copies = _DEVICE_COPIES.setdefault(model, {})
    key = (str(device), whole)
    if key not in copies:
        copies[key] = DeviceCopy(model, device, whole)
    return copies[key]


@dataclass(frozen=True)
class ClientSettings:
    """What a node needs from the run config."""

    seed: int
    partition_id: int
    batch_size: int
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    eval_batch_size: int = 512
    num_partitions: int = 1
    device: str = "cpu"

    @classmethod
    def from_config(cls, config: Mapping[str, Any], partition_id: int, num_partitions: int = 1) -> ClientSettings:
        return cls(
            num_partitions=num_partitions,
            seed=config["seed"],
            partition_id=partition_id,
            batch_size=config["batch-size"],
            optimizer=config["client.optimizer"],
            weight_decay=config["client.weight-decay"],
            eval_batch_size=config["eval-batch-size"],
            device=config["client.device"],
        )


class HOSFLClient(NumPyClient):
    """One node over a :class:`SplitModel` (shared by the nodes of a process) and its data partition.

    ``model`` is the canonical replica: ``θ_c`` float32 on the CPU. The node's computation goes through
    :meth:`smash`, :meth:`probe` and :meth:`compute_model` / :meth:`commit`, which run on a
    :class:`DeviceCopy` when ``settings.device`` is not the CPU (or :attr:`always_copy` is set).
    """

    always_copy: ClassVar[bool] = False
    """Compute on a device copy even on the CPU (what a GPU node does, without a GPU)."""

    def __init__(
        self,
        model: SplitModel,
        train: Examples,
        settings: ClientSettings,
        initial_client_state: Mapping[str, torch.Tensor],
        state: RecordDict | None = None,
        store: WeightStore | None = None,
        run_id: str = "0",
        node_id: int = 0,
    ) -> None:
        self.model = model
        self.train = train
        self.settings = settings
        self.initial_client_state = initial_client_state
        self.state = state if state is not None else RecordDict()
        self.store = store if store is not None else NODE_STORE
        self.run_id, self.node_id = str(run_id), int(node_id)

    def handle(self, request: Payload, server_round: int) -> Payload:
        """Serve ``request`` (of round ``server_round``) with its protocol's handler; returns the typed reply."""
        from ..protocols.registry import handler_for

        return handler_for(type(request))(self, request, server_round)

    # ----------------------------------------------------------------- weight versions
    def _record(self, key: str, kind: type) -> Any:
        record = self.state.get(key)  # not ``state.config_records``: that view is rebuilt on every access
        return record if isinstance(record, kind) else None

    @property
    def version(self) -> WeightTag | None:
        """The version of ``θ_c`` this node is at (``None``: its initial weights)."""
        sync = self._record(STATE_SYNC, ConfigRecord)
        return None if sync is None else (int(sync["applied-round"]), str(sync["fingerprint"]))

    @property
    def applied_round(self) -> int:
        """The last round whose client update this node has applied (0: none)."""
        version = self.version
        return version[0] if version is not None else 0

    def restore(self) -> ClientOptimizer:
        """Load this node's ``θ_c`` into the (shared) model and return its optimizer with state.

        A version the store cannot produce (evicted, another machine, a file that fails its
        fingerprint) sends the node back to its initial weights at round 0: the server sees the
        mismatch and repairs it.
        """
        optimizer = make_client_optimizer(self.settings.optimizer, self.settings.weight_decay)
        version = self.version
        if version is None:
            self.model.load_client_state(self.initial_client_state)
            self.store.mark(self.model, None)
            return optimizer
        tensors = self.store.get(self.run_id, self.node_id, version)
        if tensors is None:
            del self.state[STATE_SYNC]
            return self.restore()
        if not self.store.holds(self.model, version):
            self.model.load_client_state(weights_of(tensors))
            self.store.mark(self.model, version)
        optimizer.load_state_tensors(optimizer_of(tensors))
        return optimizer

    def persist(self, optimizer: ClientOptimizer, applied_round: int) -> str:
        """Keep the model's ``θ_c`` and the optimizer's state as this node's version; return its fingerprint."""
        fp = fingerprint(self.model.client_parameters())
        tag = (int(applied_round), fp)
        tensors = dict(self.model.client_state())
        tensors.update({OPTIMIZER_PREFIX + k: v for k, v in optimizer.state_tensors().items()})
        self.store.put(self.run_id, self.node_id, tag, tensors)
        self.store.mark(self.model, tag)
        self.state[STATE_SYNC] = ConfigRecord({"applied-round": tag[0], "fingerprint": fp})
        return fp

    def fingerprint(self) -> str:
        """Fingerprint of the model's ``θ_c`` (taken from the version when the model holds it)."""
        version = self.version
        if version is not None and self.store.holds(self.model, version):
            return version[1]
        return fingerprint(self.model.client_parameters())

    def catch_up(self, catch_up: CatchUp) -> tuple[ClientOptimizer, int]:
        """Bring ``θ_c`` up to date: adopt the replacement weights if sent, then replay the entries it lacks.

        Entries already applied (a reply that was lost) are skipped; a node older than ``from_round``
        cannot catch up, stays as it is, and its fingerprint tells the server.
        """
        optimizer = self.restore()
        applied, changed = self.applied_round, False
        if catch_up.replacement is not None:
            self.model.load_client_state(weights_of(catch_up.replacement))
            optimizer.load_state_tensors(optimizer_of(catch_up.replacement))
            applied, changed = catch_up.replacement_round, True
        if applied >= catch_up.from_round:
            pending = [e for e in catch_up.entries if e.round > applied]
            if pending:
                replay(self.model.client_parameters(), optimizer, pending)
                applied, changed = pending[-1].round, True
        if changed:
            self.persist(optimizer, applied)
        return optimizer, applied

    # ----------------------------------------------------------------- where the node computes
    @property
    def device(self) -> torch.device:
        """The device of the node's computation (``client.device``)."""
        return torch.device(self.settings.device)

    @property
    def on_copy(self) -> bool:
        """Whether the node computes on a :class:`DeviceCopy` instead of :attr:`model` itself."""
        return self.always_copy or self.device.type != "cpu"

    def device_copy(self, whole: bool = False) -> DeviceCopy:
        """The process's :class:`DeviceCopy` of :attr:`model` on :attr:`device` (not refreshed)."""
        return device_copy(self.model, self.device, whole)

    def compute_model(self, whole: bool = False) -> SplitModel:
        """The model the node computes on: :attr:`model`, or its device copy refreshed from it (the client
        segment, or ``whole``). After training it, :meth:`commit` makes the result canonical."""
        return self.device_copy(whole).pull() if self.on_copy else self.model

    def commit(self, whole: bool = False) -> None:
        """Copy what a step trained on :meth:`compute_model` back into :attr:`model` (no-op without a copy)."""
        if self.on_copy:
            self.device_copy(whole).push()

    @overload
    def to_compute(self, tensors: torch.Tensor) -> torch.Tensor: ...

    @overload
    def to_compute(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def to_compute(self, tensors: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        """A tensor, or a mapping of them, on the device of :meth:`compute_model`."""
        if isinstance(tensors, torch.Tensor):
            return tensors.to(self.device) if self.on_copy else tensors
        return {k: v.to(self.device) for k, v in tensors.items()} if self.on_copy else dict(tensors)

    def smash(self, inputs: Inputs) -> Smashed:
        """``model.smash(inputs)`` on :meth:`compute_model`; the smashed tensors come back on the CPU."""
        if not self.on_copy:
            return self.model.smash(inputs)
        smashed = self.compute_model().smash(self.to_compute(inputs))
        return {k: v.to("cpu") for k, v in smashed.items()}

    def probe(
        self,
        estimator: str,
        inputs: Inputs,
        lam: torch.Tensor,
        seeds: Sequence[int],
        mu: float,
        anchor: float | None,
        distribution: str,
    ) -> list[float]:
        """HO-SFL's probe scalars (:func:`~hosfl_flower.zo.probe_scalars`) of ``θ_c`` on ``inputs``.

        On a device copy, ``forward`` and ``central`` perturb the canonical CPU ``θ_c`` exactly as a CPU
        node does and run each forward on the copy refreshed from it (one host-to-device copy of ``θ_c``
        per forward); ``jvp`` runs on the copy, its directions drawn on the CPU and moved. ``⟨λ, ·⟩`` is
        folded on the device; only the scalars come back.
        """
        if not self.on_copy:
            forward = lambda: self.model.smash(inputs)["z"]  # noqa: E731 - the estimators take a callable
            return probe_scalars(estimator, forward, self.model.client, lam, seeds, mu, anchor=anchor, distribution=distribution)
        work = self.device_copy()
        model, on_device, lam = work.pull(), work.to_device(inputs), lam.to(work.device)
        if estimator == "jvp":
            forward, module = (lambda: model.smash(on_device)["z"]), model.client
        else:
            forward, module = (lambda: work.pull().smash(on_device)["z"]), self.model.client
        return probe_scalars(estimator, forward, module, lam, seeds, mu, anchor=anchor, distribution=distribution)

    # ----------------------------------------------------------------- data and scratch
    def draw_batch(self, server_round: int, step: int | None = None) -> Examples:
        """This node's minibatch of a round (and local step): the same on every run with the same seed."""
        parts = (server_round,) if step is None else (server_round, step)
        return sample_batch(self.train, self.settings.batch_size, self.settings.seed, self.settings.partition_id, *parts)

    def keep(self, name: str, tag: Sequence[int], tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep small per-round tensors (a batch's inputs) in the node state until :meth:`take`."""
        self.state[SCRATCH_PREFIX + name] = tensors_to_record(tensors)
        self.state[SCRATCH_PREFIX + name + ".tag"] = ConfigRecord({"tag": [int(t) for t in tag]})

    def take(self, name: str, tag: Sequence[int], drop: bool = True) -> dict[str, torch.Tensor]:
        """The tensors kept under ``name`` for ``tag``; :class:`OutOfSyncError` if there are none."""
        record = self._record(SCRATCH_PREFIX + name, ArrayRecord)
        kept_tag = self._record(SCRATCH_PREFIX + name + ".tag", ConfigRecord)
        if record is None or kept_tag is None or list(kept_tag["tag"]) != [int(t) for t in tag]:
            raise OutOfSyncError(f"no {name} kept for {tuple(tag)} on this node")
        tensors = record_to_tensors(record)
        if drop:
            del self.state[SCRATCH_PREFIX + name], self.state[SCRATCH_PREFIX + name + ".tag"]
        return tensors

    # ----------------------------------------------------------------- NumPyClient (whole model)
    def get_parameters(self, config: Mapping[str, Any]) -> list[np.ndarray]:
        """The whole model's state (client and server segments) as NumPy arrays."""
        return [v.detach().cpu().numpy() for v in self.model.state_dict().values()]

    def set_parameters(self, parameters: Sequence[np.ndarray]) -> None:
        """Load whole-model arrays in ``state_dict`` order."""
        keys = list(self.model.state_dict())
        if len(keys) != len(parameters):
            raise ValueError(f"expected {len(keys)} arrays for the whole model, got {len(parameters)}")
        self.model.load_state_dict({k: torch.from_numpy(np.asarray(p)) for k, p in zip(keys, parameters)})

    def fit(self, parameters, config):
        """First-order local training of the whole model: ``local-steps`` SGD steps at ``lr``."""
        self.set_parameters(parameters)
        steps, lr = int(config.get("local-steps", 1)), float(config.get("lr", 0.05))
        server_round = int(config.get("server-round", 0))
        model = self.compute_model(whole=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        model.train()
        total = 0.0
        for step in range(steps):
            batch = self.draw_batch(server_round, step)
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(model(self.to_compute(batch.inputs)), self.to_compute(batch.labels))
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        model.eval()
        self.commit(whole=True)
        return self.get_parameters({}), len(self.train), {"train-loss": total / max(steps, 1)}

    def evaluate(self, parameters, config):
        """Loss and accuracy of the whole model on this node's data."""
        self.set_parameters(parameters)
        loss, accuracy = evaluate_model(self.model, self.train, self.settings.eval_batch_size)
        return loss, len(self.train), {"accuracy": accuracy}
