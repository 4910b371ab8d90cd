"""Checkpoints of a strategy's run: the segments, the schedule, the history and the protocol's own
state, written atomically and loaded whole or not at all (:mod:`hosfl_flower.checkpoint`)."""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO
from typing import TYPE_CHECKING, Any

import torch
from flwr.common.logger import log

from ..checkpoint import CheckpointError, check_same_run, check_tensors, checkpoint_path, read_checkpoint, save_checkpoint
from ..config import all_options

if TYPE_CHECKING:
    from ..models import SplitModel
    from ..protocols.base import ProtocolServer
    from ..schedule import RoundSchedule
    from ..split_server import RaySplitServer, SplitServer

STATE_KEYS = ("server", "client", "schedule", "torch-rng", "history", "evaluations", "skipped-in-a-row", "protocol")


class CheckpointMixin:
    """What :class:`~hosfl_flower.flower.strategy.HOSFLStrategy` saves and resumes."""

    if TYPE_CHECKING:  # provided by HOSFLStrategy
        cfg: dict[str, Any]
        name: str
        model: SplitModel
        schedule: RoundSchedule
        num_rounds: int
        history: list[dict[str, Any]]
        evaluations: dict[int, dict[str, Any]]
        skipped_in_a_row: int

        @property
        def split_server(self) -> SplitServer | RaySplitServer: ...

        @property
        def protocol(self) -> ProtocolServer: ...

        def sync_server_weights(self) -> None: ...

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resumed run needs."""
        return {
            "server": self.split_server.state(),
            "client": {k: v.detach().clone() for k, v in self.model.client_state().items()},
            "schedule": self.schedule.state(),
            "torch-rng": torch.get_rng_state(),
            "history": [dict(row) for row in self.history],
            "evaluations": {int(r): dict(m) for r, m in self.evaluations.items()},
            "skipped-in-a-row": self.skipped_in_a_row,
            "protocol": self.protocol.state(),
        }

    def check_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """:class:`CheckpointError` unless ``state`` fits this strategy and model (nothing is loaded)."""
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise CheckpointError(f"checkpoint lacks {', '.join(missing)}")
        check_tensors("client segment", state["client"], self.model.client_state())
        check_tensors("server segment", state["server"].get("weights"), self.model.server.state_dict())
        groups = state["server"].get("optimizer", {}).get("param_groups", [])
        if sum(len(g["params"]) for g in groups) != len(self.model.server_parameters()):
            raise CheckpointError("checkpoint's server optimizer does not fit this model's server segment")
        try:
            self.protocol.check_state(state["protocol"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint's {self.protocol.name} state does not fit: {error}") from None

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Load a checked :meth:`checkpoint_state`."""
        self.split_server.load_state(state["server"])
        self.sync_server_weights()
        self.model.load_client_state(state["client"])
        self.schedule.set_state(state["schedule"])
        torch.set_rng_state(state["torch-rng"])
        self.history = [dict(row) for row in state["history"]]
        self.evaluations = {int(r): dict(m) for r, m in state["evaluations"].items()}
        self.skipped_in_a_row = int(state["skipped-in-a-row"])
        self.protocol.load_state(state["protocol"])

    def save_checkpoint(self, server_round: int) -> None:
        """Write the checkpoint of ``server_round`` to ``checkpoint-dir`` (atomically)."""
        path = save_checkpoint(self.cfg["checkpoint-dir"], server_round, self.cfg, self.checkpoint_state())
        log(INFO, "[%s] checkpoint of round %d written to %s", self.name, server_round, path)

    def resume(self) -> int:
        """Load the checkpoint in ``checkpoint-dir`` whole or not at all; return its round.

        A missing, corrupt or truncated file, a different run config or a state that does not fit
        the model raises :class:`CheckpointError` before anything is changed.
        """
        directory = self.cfg["checkpoint-dir"]
        content = read_checkpoint(directory)
        defaults = {key: option.default for key, option in all_options().items()}
        check_same_run(checkpoint_path(directory), content["config"], self.cfg, defaults)
        saved_round = int(content["round"])
        if saved_round >= self.num_rounds:
            raise CheckpointError(
                f"checkpoint {checkpoint_path(directory)} is of round {saved_round}: nothing left to run "
                f"with num-server-rounds={self.num_rounds}"
            )
        self.check_checkpoint_state(content["state"])
        before = self.checkpoint_state()
        try:
            self.load_checkpoint_state(content["state"])
        except Exception as error:  # noqa: BLE001 - put everything back, then refuse
            self.load_checkpoint_state(before)
            raise CheckpointError(f"checkpoint {checkpoint_path(directory)} does not load: {error}") from error
        log(INFO, "[%s] resumed from the checkpoint of round %d in %s", self.name, saved_round, directory)
        return saved_round
