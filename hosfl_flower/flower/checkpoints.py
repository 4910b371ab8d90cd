"""Checkpoints of a strategy's run: the segments, the schedule, the history and the protocol's own
state, written atomically and loaded whole or not at all (:mod:`hosfl_flower.checkpoint`)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from logging import INFO
from typing import TYPE_CHECKING, Any

import torch
from flwr.common.logger import log

from ..checkpoint import (
    CheckpointError,
    check_directory,
    check_number,
    check_optimizer_state,
    check_round,
    check_same_run,
    check_tensor,
    check_tensors,
    check_type,
    checkpoint_path,
    one_line,
    read_checkpoint,
    save_checkpoint,
    type_name,
)
from ..config import all_options
from ..schedule import RoundSchedule
from ..split_server import make_server_optimizer

if TYPE_CHECKING:
    from ..models import SplitModel
    from ..protocols.base import ProtocolServer
    from ..split_server import RaySplitServer, SplitServer

STATE_KEYS = ("server", "client", "schedule", "torch-rng", "history", "evaluations", "skipped-in-a-row", "protocol")
OPTIONAL_STATE_KEYS = ("reply-bound",)
"""Parts a checkpoint of an earlier version may lack (``reply-bound``: the accepted reply sizes the bound
compares with; without it a resumed run's bound starts with no history)."""


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
            "reply-bound": list(self.protocol.reply_bound.history),
        }

    def check_checkpoint_state(self, state: Any, saved_round: int | None = None) -> None:
        """:class:`CheckpointError` unless ``state`` fits this strategy and model (nothing is loaded).

        Every container has its type, every tensor its shape, dtype and finite entries; the history,
        the evaluations and the protocol's ledger stop at ``saved_round`` (the checkpoint's round).
        """
        if not isinstance(state, Mapping):
            raise CheckpointError(f"checkpoint's state is {type_name(state)}, expected a dict")
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise CheckpointError(f"checkpoint lacks {', '.join(missing)}")
        unexpected = sorted(set(state) - set(STATE_KEYS) - set(OPTIONAL_STATE_KEYS), key=str)
        if unexpected:
            raise CheckpointError(f"checkpoint has unexpected parts {unexpected[:3]}")
        check_tensors("client segment", state["client"], self.model.client_state())
        self.check_server_state(state["server"])
        self.check_schedule_state(state["schedule"])
        check_tensor("checkpoint's torch-rng", state["torch-rng"], tuple(torch.get_rng_state().shape), torch.uint8)
        self.check_history(state["history"], state["evaluations"], saved_round)
        check_number("checkpoint's skipped-in-a-row", state["skipped-in-a-row"], integer=True, minimum=0)
        if saved_round is not None and state["skipped-in-a-row"] > saved_round:
            raise CheckpointError(f"checkpoint's skipped-in-a-row is {state['skipped-in-a-row']}, after {saved_round} rounds")
        if "reply-bound" in state:
            self.check_reply_bound_state(state["reply-bound"])
        protocol = state["protocol"]
        if not isinstance(protocol, Mapping):
            raise CheckpointError(f"checkpoint's {self.protocol.name} state is {type_name(protocol)}, expected a dict")
        try:
            self.protocol.check_state(protocol)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as error:
            raise CheckpointError(f"checkpoint's {self.protocol.name} state does not fit: {one_line(error)}") from None
        ledger = protocol.get("ledger")
        last = ledger[-1] if isinstance(ledger, Sequence) and ledger else None
        last_round = last[0] if isinstance(last, (list, tuple)) and last and isinstance(last[0], int) else None
        if saved_round is not None and last_round is not None and last_round > saved_round:
            raise CheckpointError(
                f"checkpoint's {self.protocol.name} ledger ends at round {last_round}, after the checkpoint's round {saved_round}"
            )

    def check_server_state(self, server: Any) -> None:
        """The split server's part: ``θ_s`` and an optimizer state that fits the run config's server optimizer."""
        if not isinstance(server, Mapping):
            raise CheckpointError(f"checkpoint's server is {type_name(server)}, expected a dict")
        if set(server) != {"weights", "optimizer"}:
            raise CheckpointError(f"checkpoint's server has parts {sorted(server, key=str)}, expected ['optimizer', 'weights']")
        check_tensors("server segment", server["weights"], self.model.server.state_dict())
        params = self.model.server_parameters()
        optimizer = make_server_optimizer(
            self.cfg["server.optimizer"],
            params,
            self.cfg["server.lr"],
            self.cfg["server.momentum"],
            self.cfg["server.weight-decay"],
        )
        check_optimizer_state("server optimizer", server["optimizer"], optimizer, params)

    def check_reply_bound_state(self, sizes: Any) -> None:
        """The reply bound's history: at most its length of finite sizes >= 0."""
        check_type("checkpoint's reply-bound", sizes, list)
        limit = self.protocol.reply_bound.history.maxlen
        if limit is not None and len(sizes) > limit:
            raise CheckpointError(f"checkpoint's reply-bound holds {len(sizes)} sizes, at most {limit} are kept")
        for size in sizes:
            check_number("checkpoint's reply-bound size", size, minimum=0)

    def check_schedule_state(self, schedule: Any) -> None:
        """The schedule's generator state, set on a scratch schedule (never on this run's)."""
        if not isinstance(schedule, Mapping):
            raise CheckpointError(f"checkpoint's schedule is {type_name(schedule)}, expected a dict")
        expected = self.schedule.state().get("bit_generator")
        if schedule.get("bit_generator") != expected:
            raise CheckpointError(
                f"checkpoint's schedule is of generator {schedule.get('bit_generator')!r}, expected {expected!r}"
            )
        try:
            RoundSchedule(0).set_state(copy.deepcopy(dict(schedule)))
        except Exception as error:  # noqa: BLE001 - numpy's checks of a generator state raise several kinds
            raise CheckpointError(f"checkpoint's schedule is invalid: {one_line(error)}") from None

    def check_history(self, history: Any, evaluations: Any, saved_round: int | None) -> None:
        """One row per round ``1..saved_round`` (JSON scalars); evaluations of rounds ``0..saved_round``."""
        check_type("checkpoint's history", history, list)
        for position, row in enumerate(history):
            where = f"checkpoint's history row {position}"
            check_type(where, row, dict)
            for key, value in row.items():
                check_type(f"{where} key", key, str)
                _check_metric(f"{where} {key}", value, (int, float, str, bool, type(None)))
            check_number(f"{where} round", row.get("round"), integer=True, minimum=1)
            if row["round"] != position + 1:
                raise CheckpointError(f"{where} is of round {row['round']}, expected {position + 1}")
        if saved_round is not None and len(history) != saved_round:
            raise CheckpointError(f"checkpoint's history has {len(history)} rows, its round is {saved_round}")
        check_type("checkpoint's evaluations", evaluations, dict)
        for server_round, metrics in evaluations.items():
            check_number("checkpoint's evaluation round", server_round, integer=True, minimum=0)
            if saved_round is not None and server_round > saved_round:
                raise CheckpointError(f"checkpoint's evaluations include round {server_round}, after its round {saved_round}")
            where = f"checkpoint's evaluation of round {server_round}"
            check_type(where, metrics, dict)
            for key, value in metrics.items():
                check_type(f"{where} key", key, str)
                _check_metric(f"{where} {key}", value, (int, float))

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
        self.protocol.reply_bound.history.clear()
        self.protocol.reply_bound.history.extend(float(size) for size in state.get("reply-bound", ()))

    def save_checkpoint(self, server_round: int) -> None:
        """Write the checkpoint of ``server_round`` to ``checkpoint-dir`` (atomically)."""
        path = save_checkpoint(self.cfg["checkpoint-dir"], server_round, self.cfg, self.checkpoint_state())
        log(INFO, "[%s] checkpoint of round %d written to %s", self.name, server_round, path)

    def start_checkpoints(self) -> int:
        """The first round to run: check ``checkpoint-dir`` (when checkpoints are written or read), then
        resume from it with ``resume``; a bad directory or checkpoint fails here, before round 1."""
        if self.cfg["checkpoint-every"] or self.cfg["resume"]:
            check_directory("checkpoint-dir", self.cfg["checkpoint-dir"], writable=bool(self.cfg["checkpoint-every"]))
        return self.resume() + 1 if self.cfg["resume"] else 1

    def resume(self) -> int:
        """Load the checkpoint in ``checkpoint-dir`` whole or not at all; return its round.

        A missing, corrupt or truncated file, a different run config, or a state that does not fit
        the model (a container of the wrong type, a tensor of the wrong shape or dtype or with
        entries that are not finite, an invalid ledger) raises :class:`CheckpointError` before
        anything is changed.
        """
        directory = self.cfg["checkpoint-dir"]
        path = checkpoint_path(directory)
        content = read_checkpoint(directory)
        defaults = {key: option.default for key, option in all_options().items()}
        check_same_run(path, content["config"], self.cfg, defaults)
        saved_round = check_round(path, content["round"], self.num_rounds)
        self.check_checkpoint_state(content["state"], saved_round)
        before = self.checkpoint_state()
        try:
            self.load_checkpoint_state(content["state"])
        except Exception as error:  # noqa: BLE001 - put everything back, then refuse
            self.load_checkpoint_state(before)
            raise CheckpointError(f"checkpoint {path} does not load: {one_line(error)}") from error
        log(INFO, "[%s] resumed from the checkpoint of round %d in %s", self.name, saved_round, directory)
        return saved_round


def _check_metric(what: str, value: Any, kinds: tuple[type, ...]) -> None:
    """A metric is a scalar of ``kinds`` or a list of numbers (what a ``MetricRecord`` may hold)."""
    if isinstance(value, list):
        for item in value:
            check_type(what, item, (int, float))
    else:
        check_type(what, value, kinds)
