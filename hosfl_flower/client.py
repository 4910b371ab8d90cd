"""``HOSFLClient``: the client side of every protocol, as a Flower ``NumPyClient``.

``get_parameters`` / ``fit`` / ``evaluate`` keep their usual NumPyClient meaning (whole-model
first-order training, used by the FedAvg baseline). The HO-SFL protocol adds ``smash``, ``probe``
and ``sync``. The client object is rebuilt for every message: everything it must remember lives in
the node's ``context.state`` (a ``RecordDict``) under the ``hosfl.*`` keys.

The node state is the only source of truth. A process-local cache (:class:`WeightCache`) only saves
work: it remembers which node state the process's shared model currently holds, and keeps the last
few versions of ``θ_c`` as tensors, both keyed by ``(applied round, fingerprint)`` — nodes that
applied the same rounds hold bit-identical weights, so one cached version serves all of them. A miss
(another process, an evicted version, a model changed since) decodes the node state as before.
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.client import NumPyClient

from .data import Examples, sample_batch
from .evaluation import evaluate_model
from .models import SplitModel
from .records import record_to_tensors, tensors_to_record
from .zo import (
    SGD,
    ClientOptimizer,
    LedgerEntry,
    apply_entry,
    dot64,
    fingerprint,
    make_client_optimizer,
    mix_seed,
    needs_anchor,
    perturb_,
    probe_scalars,
    replay,
    trainable_parameters,
)

STATE_WEIGHTS = "hosfl.client-weights"
STATE_OPTIMIZER = "hosfl.client-optimizer"
STATE_SYNC = "hosfl.sync"
STATE_PROBE = "hosfl.probe"
STATE_SPLITFED = "hosfl.splitfed-weights"
STATE_SPLITFED_BATCH = "hosfl.splitfed-batch"
OPTIMIZER_PREFIX = "optimizer."


WeightTag = tuple[int, str]
"""``(applied round, fingerprint of θ_c)``: names one version of the client weights exactly."""


class WeightCache:
    """Process-local shortcuts for restoring ``θ_c`` into a shared model; never the source of truth.

    ``holds(model, tag)`` is true only if the model's client parameters were last set to version
    ``tag`` by this class and have not been modified since: each parameter's in-place version counter
    and storage are recorded when the tag is marked, so any later in-place change (a load, a
    perturbation, an optimizer step) or replacement of a parameter makes the check fail. ``get``
    returns a kept copy of a version (the ``versions`` most recently stored per model).
    """

    def __init__(self, versions: int = 2) -> None:
        self.versions = versions
        self._held: weakref.WeakKeyDictionary[SplitModel, tuple[WeightTag, tuple]] = weakref.WeakKeyDictionary()
        self._kept: weakref.WeakKeyDictionary[SplitModel, OrderedDict[WeightTag, dict[str, torch.Tensor]]] = (
            weakref.WeakKeyDictionary()
        )

    @staticmethod
    def _stamp(model: SplitModel) -> tuple:
        return tuple((id(p), p.data_ptr(), p._version) for p in model.client_parameters())

    def holds(self, model: SplitModel, tag: WeightTag | None) -> bool:
        """Whether ``model`` holds exactly version ``tag`` of the client weights right now."""
        held = self._held.get(model)
        return tag is not None and held is not None and held[0] == tag and held[1] == self._stamp(model)

    def mark(self, model: SplitModel, tag: WeightTag | None) -> None:
        """Record that ``model`` now holds version ``tag`` (``None``: nothing known)."""
        if tag is None:
            self._held.pop(model, None)
        else:
            self._held[model] = (tag, self._stamp(model))

    def get(self, model: SplitModel, tag: WeightTag | None) -> dict[str, torch.Tensor] | None:
        """The kept copy of version ``tag`` for ``model``, or ``None``."""
        kept = self._kept.get(model)
        if tag is None or kept is None or tag not in kept:
            return None
        kept.move_to_end(tag)
        return kept[tag]

    def put(self, model: SplitModel, tag: WeightTag) -> None:
        """Keep a copy of the model's current client weights as version ``tag`` (the caller vouches)."""
        kept = self._kept.setdefault(model, OrderedDict())
        if tag in kept:
            kept.move_to_end(tag)
        else:
            kept[tag] = {k: v.clone() for k, v in model.client_state().items()}
            while len(kept) > self.versions:
                kept.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (the next restore of every node decodes its state)."""
        self._held = weakref.WeakKeyDictionary()
        self._kept = weakref.WeakKeyDictionary()


WEIGHT_CACHE = WeightCache()
"""The process's cache of client weights (see :class:`WeightCache`)."""


class OutOfSyncError(RuntimeError):
    """The node cannot apply the ledger entries it was sent (its state is older than the server assumed)."""


@dataclass(frozen=True)
class ClientSettings:
    """What a node needs from the run config."""

    seed: int
    partition_id: int
    batch_size: int
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    eval_batch_size: int = 512

    @classmethod
    def from_config(cls, config: Mapping[str, Any], partition_id: int) -> "ClientSettings":
        return cls(
            seed=config["seed"],
            partition_id=partition_id,
            batch_size=config["batch-size"],
            optimizer=config["client.optimizer"],
            weight_decay=config["client.weight-decay"],
            eval_batch_size=config["eval-batch-size"],
        )


@dataclass
class SmashResult:
    """The smash reply: smashed activation (+ companions), labels, and the node's sync state."""

    smashed: dict[str, torch.Tensor]
    labels: torch.Tensor
    fingerprint: str
    applied_round: int
    seconds: float
    perturbed: list[torch.Tensor] | None = None

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])


class HOSFLClient(NumPyClient):
    """Client half of HO-SFL (and of the baselines) over a :class:`SplitModel` and a data partition."""

    def __init__(
        self,
        model: SplitModel,
        train: Examples,
        settings: ClientSettings,
        initial_client_state: Mapping[str, torch.Tensor],
        state: RecordDict | None = None,
    ) -> None:
        self.model = model
        self.train = train
        self.settings = settings
        self.initial_client_state = initial_client_state
        self.state = state if state is not None else RecordDict()

    # ----------------------------------------------------------------- node state
    def _array_record(self, key: str) -> ArrayRecord | None:
        # ``RecordDict.array_records`` builds a new synced view on every access, and that view sits in a
        # reference cycle: records reached through it outlive a ``del`` until the garbage collector runs
        record = self.state.get(key)
        return record if isinstance(record, ArrayRecord) else None

    def _config_record(self, key: str) -> ConfigRecord | None:
        record = self.state.get(key)
        return record if isinstance(record, ConfigRecord) else None

    @property
    def applied_round(self) -> int:
        """The last round whose client update this node has applied (0: none)."""
        sync = self._config_record(STATE_SYNC)
        return int(sync["applied-round"]) if sync is not None else 0

    def _weight_tag(self) -> WeightTag | None:
        """The version of ``θ_c`` the node state holds, if the state names it (``None``: unnamed)."""
        sync = self._config_record(STATE_SYNC)
        if sync is None or "fingerprint" not in sync or self._array_record(STATE_WEIGHTS) is None:
            return None
        return int(sync["applied-round"]), str(sync["fingerprint"])

    def _load_weights(self) -> None:
        """Make the shared model hold this node's ``θ_c``: nothing to do if it already does, a copy from
        the process cache if that version is kept, otherwise decoded from the node state."""
        weights = self._array_record(STATE_WEIGHTS)
        if weights is None:
            self.model.load_client_state(self.initial_client_state)
            WEIGHT_CACHE.mark(self.model, None)
            return
        tag = self._weight_tag()
        if WEIGHT_CACHE.holds(self.model, tag):
            return
        kept = WEIGHT_CACHE.get(self.model, tag)
        self.model.load_client_state(kept if kept is not None else record_to_tensors(weights))
        if tag is not None:
            WEIGHT_CACHE.put(self.model, tag)
        WEIGHT_CACHE.mark(self.model, tag)

    def restore(self) -> ClientOptimizer:
        """Load this node's ``θ_c`` into the (shared) model and return its optimizer with state."""
        self._load_weights()
        optimizer = make_client_optimizer(self.settings.optimizer, self.settings.weight_decay)
        saved = self._array_record(STATE_OPTIMIZER)
        if saved is not None:
            optimizer.load_state_tensors(record_to_tensors(saved))
        return optimizer

    def persist(self, optimizer: ClientOptimizer, applied_round: int) -> str:
        """Store the model's ``θ_c``, the optimizer state and the applied round in the node state.

        Returns the fingerprint of ``θ_c``, which the state keeps next to the applied round.
        """
        fp = fingerprint(self.model.client_parameters())
        self.state[STATE_WEIGHTS] = tensors_to_record(self.model.client_state())
        self.state[STATE_OPTIMIZER] = tensors_to_record(optimizer.state_tensors())
        self.state[STATE_SYNC] = ConfigRecord({"applied-round": int(applied_round), "fingerprint": fp})
        tag = (int(applied_round), fp)
        WEIGHT_CACHE.put(self.model, tag)
        WEIGHT_CACHE.mark(self.model, tag)
        return fp

    def _fingerprint(self) -> str:
        """Fingerprint of the model's ``θ_c`` (read from the node state when the model holds that version)."""
        tag = self._weight_tag()
        if WEIGHT_CACHE.holds(self.model, tag):
            return tag[1]
        return fingerprint(self.model.client_parameters())

    def client_state_tensors(self, optimizer: ClientOptimizer) -> dict[str, torch.Tensor]:
        """``θ_c`` and the optimizer state in one flat dict (what a weight repair carries)."""
        tensors = dict(self.model.client_state())
        tensors.update({OPTIMIZER_PREFIX + k: v for k, v in optimizer.state_tensors().items()})
        return tensors

    def catch_up(
        self,
        entries: Sequence[LedgerEntry],
        from_round: int,
        replacement: Mapping[str, torch.Tensor] | None = None,
        replacement_round: int = 0,
    ) -> tuple[ClientOptimizer, int]:
        """Bring ``θ_c`` up to date: adopt ``replacement`` weights if sent, then replay the entries it lacks.

        Entries the node has already applied (a reply that was lost) are skipped; if the node is older
        than ``from_round`` it cannot catch up, leaves its state alone, and its fingerprint will tell.
        """
        optimizer = self.restore()
        applied = self.applied_round
        changed = False
        if replacement is not None:
            weights = {k: v for k, v in replacement.items() if not k.startswith(OPTIMIZER_PREFIX)}
            self.model.load_client_state(weights)
            optimizer.load_state_tensors(
                {k[len(OPTIMIZER_PREFIX):]: v for k, v in replacement.items() if k.startswith(OPTIMIZER_PREFIX)}
            )
            applied, changed = replacement_round, True
        if applied >= from_round:
            pending = [e for e in entries if e.round > applied]
            if pending:
                replay(self.model.client_parameters(), optimizer, pending)
                applied, changed = pending[-1].round, True
        if changed:  # θ_c is encoded into the node state once per message, and only when it changed
            self.persist(optimizer, applied)
        return optimizer, applied

    def draw_batch(self, server_round: int, step: int | None = None) -> Examples:
        """This node's minibatch of a round (and local step): the same on every run with the same seed."""
        parts = (server_round,) if step is None else (server_round, step)
        return sample_batch(self.train, self.settings.batch_size, self.settings.seed, self.settings.partition_id, *parts)

    def _catch_up_and_smash(
        self, server_round: int, entries, from_round: int, replacement, replacement_round: int
    ) -> tuple[int, Examples, dict[str, torch.Tensor]]:
        _, applied = self.catch_up(entries, from_round, replacement, replacement_round)
        batch = self.draw_batch(server_round)
        return applied, batch, self.model.smash(batch.inputs)

    # ----------------------------------------------------------------- HO-SFL protocol
    @torch.no_grad()
    def smash(
        self,
        server_round: int,
        entries: Sequence[LedgerEntry],
        from_round: int,
        replacement: Mapping[str, torch.Tensor] | None = None,
        replacement_round: int = 0,
    ) -> SmashResult:
        """Catch up, draw this round's minibatch, and return ``z = f_c(x)`` computed without gradients."""
        start = time.perf_counter()
        applied, batch, smashed = self._catch_up_and_smash(server_round, entries, from_round, replacement, replacement_round)
        self.state[STATE_PROBE] = tensors_to_record(
            {**{f"input.{k}": v for k, v in batch.inputs.items()}, "z": smashed["z"]}
        )
        self.state[STATE_PROBE + ".round"] = ConfigRecord({"round": int(server_round)})
        return SmashResult(smashed, batch.labels, self._fingerprint(), applied, time.perf_counter() - start)

    @torch.no_grad()
    def probe(
        self,
        server_round: int,
        activation_grad: torch.Tensor,
        seeds: Sequence[int],
        mu: float,
        estimator: str = "forward",
        directions: str = "gaussian",
    ) -> tuple[list[float], float]:
        """One scalar ``v_p`` per seed on the batch kept by :meth:`smash`, e.g. ``⟨λ, f_c(x; θ + μ u_p) − z⟩``.

        ``estimator`` (:data:`~hosfl_flower.zo.ESTIMATORS`) and ``directions`` (the distribution of
        ``u_p``) come with the probe message: the server chooses them, as it chooses the directions of
        the ledger entry the scalars become. The kept batch is decoded once and its record dropped from
        the node state before any forward pass; with ``forward``, ``⟨λ, z⟩`` is folded into one float64
        scalar so ``z`` is freed too (the other estimators do not use ``z``). Through the probes the
        node holds the inputs, ``λ`` and one perturbed output (or tangent) at a time.
        """
        start = time.perf_counter()
        kept = self._array_record(STATE_PROBE)
        kept_round = self._config_record(STATE_PROBE + ".round")
        if kept is None or kept_round is None or int(kept_round["round"]) != server_round:
            raise OutOfSyncError(f"probe for round {server_round} but this node holds no smashed batch of that round")
        tensors = record_to_tensors(kept)
        z = tensors.pop("z")
        if z.shape != activation_grad.shape:
            raise ValueError(f"λ has shape {tuple(activation_grad.shape)} but z has shape {tuple(z.shape)}")
        del kept, self.state[STATE_PROBE], self.state[STATE_PROBE + ".round"]
        inputs = {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")}
        del tensors
        anchor = dot64(activation_grad, z) if needs_anchor(estimator) else None
        del z
        self._load_weights()
        scalars = probe_scalars(
            estimator, lambda: self.model.smash(inputs)["z"], self.model.client, activation_grad, seeds, mu,
            anchor=anchor, distribution=directions,
        )
        return scalars, time.perf_counter() - start

    @torch.no_grad()
    def zo_smash(
        self,
        server_round: int,
        seeds: Sequence[int],
        mu: float,
        entries: Sequence[LedgerEntry],
        from_round: int,
        replacement: Mapping[str, torch.Tensor] | None = None,
        replacement_round: int = 0,
    ) -> SmashResult:
        """ZO-SFL: catch up, then ``z`` at ``θ_c`` and ``z̃_p`` at ``θ_c + μ u_p`` for each seed."""
        start = time.perf_counter()
        applied, batch, smashed = self._catch_up_and_smash(server_round, entries, from_round, replacement, replacement_round)
        fp = self._fingerprint()
        params = self.model.client_parameters()
        perturbed = []
        for seed in seeds:
            perturb_(params, seed, mu)
            try:
                perturbed.append(self.model.smash(batch.inputs)["z"])
            finally:
                perturb_(params, seed, -mu)
        return SmashResult(smashed, batch.labels, fp, applied, time.perf_counter() - start, perturbed)

    def sync(
        self,
        entries: Sequence[LedgerEntry],
        from_round: int,
        replacement: Mapping[str, torch.Tensor] | None = None,
        replacement_round: int = 0,
    ) -> tuple[str, int]:
        """Catch up without training; return the fingerprint of ``θ_c`` and the applied round."""
        _, applied = self.catch_up(entries, from_round, replacement, replacement_round)
        return self._fingerprint(), applied

    # ----------------------------------------------------------------- SplitFed (first-order client)
    def _load_splitfed_weights(self, weights: Mapping[str, torch.Tensor] | None) -> None:
        if weights is None:
            saved = self._array_record(STATE_SPLITFED)
            if saved is None:
                raise OutOfSyncError("no client segment received for this round")
            weights = record_to_tensors(saved)
        self.model.load_client_state(weights)

    @torch.no_grad()
    def splitfed_smash(
        self, server_round: int, step: int, weights: Mapping[str, torch.Tensor] | None = None
    ) -> SmashResult:
        """SplitFed step ``step``: adopt the round's ``θ_c`` if sent, draw a batch, return ``z``."""
        start = time.perf_counter()
        self._load_splitfed_weights(weights)
        if weights is not None:
            self.state[STATE_SPLITFED] = tensors_to_record(self.model.client_state())
        batch = self.draw_batch(server_round, step)
        smashed = self.model.smash(batch.inputs)
        self.state[STATE_SPLITFED_BATCH] = tensors_to_record({f"input.{k}": v for k, v in batch.inputs.items()})
        self.state[STATE_SPLITFED_BATCH + ".step"] = ConfigRecord({"round": int(server_round), "step": int(step)})
        return SmashResult(smashed, batch.labels, "", 0, time.perf_counter() - start)

    def splitfed_backward(
        self, server_round: int, step: int, activation_grad: torch.Tensor, lr: float
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Backpropagate ``λ`` through the client segment (``z.backward(λ)``) and take an SGD step.

        The forward pass is recomputed from the kept inputs, so no graph survives between messages.
        Returns the updated client segment and compute seconds.
        """
        start = time.perf_counter()
        tag = self._config_record(STATE_SPLITFED_BATCH + ".step")
        if tag is None or (int(tag["round"]), int(tag["step"])) != (server_round, step):
            raise OutOfSyncError(f"activation gradient for round {server_round} step {step} without its batch")
        self._load_splitfed_weights(None)
        inputs = {k[len("input."):]: v for k, v in record_to_tensors(self.state[STATE_SPLITFED_BATCH]).items()}
        client_step(self.model, inputs, activation_grad, lr)
        weights = {k: v.clone() for k, v in self.model.client_state().items()}
        self.state[STATE_SPLITFED] = tensors_to_record(weights)
        return weights, time.perf_counter() - start

    # ----------------------------------------------------------------- HERON-SFL
    def heron_train(
        self,
        server_round: int,
        client_weights: Mapping[str, torch.Tensor],
        head: torch.nn.Module,
        steps: int,
        upload_every: int,
        mu: float,
        lr: float,
    ) -> tuple[list[tuple[int, dict[str, torch.Tensor], torch.Tensor]], float]:
        """``steps`` two-point zeroth-order steps on the auxiliary loss ``ℓ(h_a(f_c(x)), y)``.

        Directions are seeded from ``(seed, partition, round, step)``. Every ``upload_every`` steps the
        unperturbed pass's ``(z, y)`` is kept for the server. Returns ``[(step, smashed, labels)]``
        and compute seconds; ``self.model.client`` and ``head`` hold the trained weights.
        """
        start = time.perf_counter()
        self.model.load_client_state(client_weights)
        params = self.model.client_parameters() + trainable_parameters(head)
        optimizer = SGD()
        kept = []
        with torch.no_grad():
            for step in range(steps):
                batch = self.draw_batch(server_round, step)
                smashed = self.model.smash(batch.inputs)
                mask = batch.inputs.get("attention_mask")
                loss0 = float(self.model.loss(head(smashed["z"], mask), batch.labels))
                if (step + 1) % upload_every == 0:
                    kept.append((step, smashed, batch.labels))
                seed = mix_seed(self.settings.seed, self.settings.partition_id, server_round, step, 0x4E50)
                perturb_(params, seed, mu)
                try:
                    loss1 = float(self.model.loss(head(self.model.smash(batch.inputs)["z"], mask), batch.labels))
                finally:
                    perturb_(params, seed, -mu)
                apply_entry(params, optimizer, LedgerEntry(step, (seed,), (loss1 - loss0,), lr, mu))
        return kept, time.perf_counter() - start

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
        start = time.perf_counter()
        self.set_parameters(parameters)
        steps, lr = int(config.get("local-steps", 1)), float(config.get("lr", 0.05))
        server_round = int(config.get("server-round", 0))
        optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.model.train()
        total = 0.0
        for step in range(steps):
            batch = self.draw_batch(server_round, step)
            optimizer.zero_grad(set_to_none=True)
            loss = self.model.loss(self.model(batch.inputs), batch.labels)
            loss.backward()
            optimizer.step()
            total += float(loss)
        self.model.eval()
        metrics = {"train-loss": total / max(steps, 1), "compute-seconds": time.perf_counter() - start}
        return self.get_parameters({}), len(self.train), metrics

    def evaluate(self, parameters, config):
        """Loss and accuracy of the whole model on this node's data."""
        self.set_parameters(parameters)
        loss, accuracy = evaluate_model(self.model, self.train, self.settings.eval_batch_size)
        return loss, len(self.train), {"accuracy": accuracy}


def client_step(model: SplitModel, inputs: Mapping[str, torch.Tensor], activation_grad: torch.Tensor, lr: float) -> None:
    """One first-order client step of split learning: recompute ``z``, ``z.backward(λ)``, SGD at ``lr``."""
    model.client.train()
    params = model.client_parameters()
    for param in params:
        param.grad = None
    z = model.smash(inputs)["z"]
    z.backward(activation_grad)
    with torch.no_grad():
        for param in params:
            if param.grad is not None:
                param.add_(param.grad, alpha=-lr)
                param.grad = None
    model.client.eval()
