"""``HOSFLClient``: the client side of every protocol, as a Flower ``NumPyClient``.

``get_parameters`` / ``fit`` / ``evaluate`` keep their usual NumPyClient meaning (whole-model
first-order training, used by the FedAvg baseline). The HO-SFL protocol adds ``smash``, ``probe``
and ``sync``. The client object is rebuilt for every message: everything it must remember lives in
the node's ``context.state`` (a ``RecordDict``) under the ``hosfl.*`` keys.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.client import NumPyClient

from .data import Examples, sample_batch
from .evaluation import evaluate_model
from .models import SplitModel
from .records import record_to_tensors, tensors_to_record
from .zo import ClientOptimizer, LedgerEntry, fingerprint, hybrid_probe_scalars, make_client_optimizer, replay

STATE_WEIGHTS = "hosfl.client-weights"
STATE_OPTIMIZER = "hosfl.client-optimizer"
STATE_SYNC = "hosfl.sync"
STATE_PROBE = "hosfl.probe"
OPTIMIZER_PREFIX = "optimizer."


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
    @property
    def applied_round(self) -> int:
        """The last round whose client update this node has applied (0: none)."""
        sync = self.state.config_records.get(STATE_SYNC)
        return int(sync["applied-round"]) if sync is not None else 0

    def restore(self) -> ClientOptimizer:
        """Load this node's ``θ_c`` into the (shared) model and return its optimizer with state."""
        weights = self.state.array_records.get(STATE_WEIGHTS)
        self.model.load_client_state(record_to_tensors(weights) if weights is not None else self.initial_client_state)
        optimizer = make_client_optimizer(self.settings.optimizer, self.settings.weight_decay)
        saved = self.state.array_records.get(STATE_OPTIMIZER)
        if saved is not None:
            optimizer.load_state_tensors(record_to_tensors(saved))
        return optimizer

    def persist(self, optimizer: ClientOptimizer, applied_round: int) -> None:
        """Store the model's ``θ_c``, the optimizer state and the applied round in the node state."""
        self.state[STATE_WEIGHTS] = tensors_to_record(self.model.client_state())
        self.state[STATE_OPTIMIZER] = tensors_to_record(optimizer.state_tensors())
        self.state[STATE_SYNC] = ConfigRecord({"applied-round": int(applied_round)})

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
        if replacement is not None:
            weights = {k: v for k, v in replacement.items() if not k.startswith(OPTIMIZER_PREFIX)}
            self.model.load_client_state(weights)
            optimizer.load_state_tensors(
                {k[len(OPTIMIZER_PREFIX):]: v for k, v in replacement.items() if k.startswith(OPTIMIZER_PREFIX)}
            )
            applied = replacement_round
            self.persist(optimizer, applied)
        if applied < from_round:
            return optimizer, applied
        pending = [e for e in entries if e.round > applied]
        if pending:
            replay(self.model.client_parameters(), optimizer, pending)
            applied = pending[-1].round
            self.persist(optimizer, applied)
        return optimizer, applied

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
        _, applied = self.catch_up(entries, from_round, replacement, replacement_round)
        batch = sample_batch(self.train, self.settings.batch_size, self.settings.seed, self.settings.partition_id, server_round)
        smashed = self.model.smash(batch.inputs)
        self.state[STATE_PROBE] = tensors_to_record(
            {**{f"input.{k}": v for k, v in batch.inputs.items()}, "z": smashed["z"]}
        )
        self.state[STATE_PROBE + ".round"] = ConfigRecord({"round": int(server_round)})
        return SmashResult(
            smashed, batch.labels, fingerprint(self.model.client_parameters()), applied, time.perf_counter() - start
        )

    @torch.no_grad()
    def probe(self, server_round: int, activation_grad: torch.Tensor, seeds: Sequence[int], mu: float) -> tuple[list[float], float]:
        """``v_p = ⟨λ, f_c(x; θ + μ u_p) − z⟩`` for each seed, on the batch kept by :meth:`smash`."""
        start = time.perf_counter()
        kept = self.state.array_records.get(STATE_PROBE)
        kept_round = self.state.config_records.get(STATE_PROBE + ".round")
        if kept is None or kept_round is None or int(kept_round["round"]) != server_round:
            raise OutOfSyncError(f"probe for round {server_round} but this node holds no smashed batch of that round")
        tensors = record_to_tensors(kept)
        inputs = {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")}
        self.restore()
        scalars = hybrid_probe_scalars(
            lambda: self.model.smash(inputs)["z"], self.model.client_parameters(), tensors["z"], activation_grad, seeds, mu
        )
        del self.state[STATE_PROBE]
        del self.state[STATE_PROBE + ".round"]
        return scalars, time.perf_counter() - start

    def sync(
        self,
        entries: Sequence[LedgerEntry],
        from_round: int,
        replacement: Mapping[str, torch.Tensor] | None = None,
        replacement_round: int = 0,
    ) -> tuple[str, int]:
        """Catch up without training; return the fingerprint of ``θ_c`` and the applied round."""
        _, applied = self.catch_up(entries, from_round, replacement, replacement_round)
        return fingerprint(self.model.client_parameters()), applied

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
        optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.model.train()
        total = 0.0
        for step in range(steps):
            batch = sample_batch(self.train, self.settings.batch_size, self.settings.seed, self.settings.partition_id, server_round, step)
            optimizer.zero_grad(set_to_none=True)
            loss = self.model.loss(self.model(batch.inputs), batch.labels)
            loss.backward()
            optimizer.step()
            total += float(loss)
        self.model.eval()
        return self.get_parameters({}), len(self.train), {"train-loss": total / max(steps, 1)}

    def evaluate(self, parameters, config):
        """Loss and accuracy of the whole model on this node's data."""
        self.set_parameters(parameters)
        loss, accuracy = evaluate_model(self.model, self.train, self.settings.eval_batch_size)
        return loss, len(self.train), {"accuracy": accuracy}
