"""What every protocol's server part builds on: the nodes as the server knows them, the :class:`Link`
that carries requests to them (Flower messages, or calls in process), and :class:`ProtocolServer`.

Nothing here imports Flower: the same server part runs under the Flower strategy adapter
(:mod:`hosfl_flower.flower`) and in the reference loop (:mod:`hosfl_flower.reference`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass
from logging import WARNING, getLogger
from typing import Any, ClassVar, Generic, TypeVar

import torch

from ..accounting import RoundAccount
from ..models import SplitModel
from ..options import Settings
from ..options import setting as _s
from ..schedule import RoundSchedule
from ..split_server import RaySplitServer, SplitServer, average_states
from .aggregation import AGGREGATORS, Aggregator, ReplyBound
from .messages import ModelSpec, Payload, ReplyError

LOG = getLogger("flwr")


@dataclass(frozen=True)
class NodeInfo:
    """A node as the server knows it: its node id, its data partition, its number of examples."""

    node_id: int
    partition_id: int
    num_examples: int


R = TypeVar("R", bound=Payload)
Check = Callable[[NodeInfo, Any], None]
"""A server-side check of a decoded reply; raises :class:`ReplyError` to reject it."""


class Link(ABC):
    """How a server part reaches its nodes. :meth:`exchange` sends one request per node and returns
    the valid replies in request order; a missing reply or one that fails validation (its
    ``from_record``, then ``check``) is counted in :attr:`rejections` and left out."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.account = RoundAccount()
        self.rejections: Counter = Counter()

    @abstractmethod
    def exchange(self, requests: Sequence[tuple[NodeInfo, Payload]], check: Check | None = None) -> dict[NodeInfo, Any]:
        """Send ``requests``; return ``{node: reply}`` of the replies kept."""

    def reject(self, reason: str, node: NodeInfo | None = None, detail: str = "") -> None:
        """Count a rejected reply by reason (and log it)."""
        self.rejections[reason] += 1
        where = f" from partition {node.partition_id}" if node is not None else ""
        LOG.log(WARNING, "[%s] reply rejected%s: %s%s", self.name, where, reason, f" ({detail})" if detail else "")

    def keep(self, node: NodeInfo, reply: Any, check: Check | None) -> bool:
        """Run ``check`` on a decoded reply; count a rejection and return ``False`` if it fails."""
        try:
            if check is not None:
                check(node, reply)
        except ReplyError as error:
            self.reject(error.reason, node, str(error))
            return False
        self.account.client_seconds += float(getattr(reply, "compute_seconds", 0.0))
        return True


@dataclass(frozen=True)
class RunSettings(Settings):
    """The run-wide keys a server part reads (the rest of the run config describes the task)."""

    seed: int = _s("seed", 0, "seed of the server RNG, initial weights, data split and minibatches", minimum=0)
    num_rounds: int = _s("num-server-rounds", 150, "rounds to run", minimum=1)
    clients_per_round: int = _s("clients-per-round", 3, "nodes sampled per round (K)", minimum=1)
    batch_size: int = _s("batch-size", 32, "examples per client minibatch", minimum=1)
    min_replies: int = _s(
        "min-replies", 1, "a round needs this many valid replies in every exchange, else it is skipped unchanged", minimum=1
    )
    aggregation: str = _s(
        "aggregation.rule",
        "mean",
        "how replies are combined: mean (weighted by examples, the papers'), or the robust median, trimmed-mean "
        "or clipped-mean (coordinate-wise; scalar uplinks and model states alike)",
        choices=AGGREGATORS,
    )
    trim_fraction: float = _s(
        "aggregation.trim-fraction",
        0.2,
        "trimmed-mean: share of replies dropped at each end of every coordinate",
        minimum=0.0,
        maximum=0.5,
    )
    clip_factor: float = _s(
        "aggregation.clip-factor",
        2.0,
        "clipped-mean: per coordinate, a value's distance from the median is clipped to this multiple of the median "
        "absolute deviation",
        minimum=0.0,
        exclusive_minimum=True,
    )
    reply_bound: float = _s(
        "aggregation.reply-bound",
        10.0,
        "reject a reply larger than this multiple of the median size of accepted replies (HO-SFL: |v|/|λ|; "
        "ZO-SFL: loss differences; model states: distance from the sent state); 0: off",
        minimum=0.0,
    )


class ServerHooks:
    """The choices a strategy may override that a server part asks for (defaults: share of examples)."""

    def aggregation_weights(self, server_round: int, num_examples: Sequence[int]) -> list[float]:
        """Weights ``w_n`` of the kept replies, given each one's number of examples (default: their share)."""
        total = sum(num_examples)
        return [n / total for n in num_examples]


S = TypeVar("S", bound=Settings)


class ProtocolServer(ABC, Generic[S]):
    """The server part of a protocol: its round logic over a :class:`Link`, with no Flower.

    It updates ``model`` (the server's copy of both segments; ``model.client`` is the global ``θ_c``)
    through ``split_server`` (which owns ``θ_s`` and its optimizer); ``schedule`` is the run's seeded
    schedule (the adapter samples the round's nodes from it first, then the part may draw seeds). Override :meth:`run_round`, and
    :meth:`state` / :meth:`check_state` / :meth:`load_state` for state a resumed run needs.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        model: SplitModel,
        spec: ModelSpec,
        run: RunSettings,
        settings: S,
        split_server: SplitServer | RaySplitServer,
        schedule: RoundSchedule,
        hooks: ServerHooks | None = None,
    ) -> None:
        self.model = model
        self.schedule = schedule
        self.spec = spec
        self.run = run
        self.settings = settings
        self.split_server = split_server
        self.hooks = hooks or ServerHooks()
        self.aggregator = Aggregator(run.aggregation, run.trim_fraction, run.clip_factor)
        self.reply_bound = ReplyBound(run.reply_bound)

    @classmethod
    def planned_cost(cls, settings: S, run: RunSettings) -> tuple[int, int]:
        """``(minibatches each sampled client processes, server optimizer steps)`` of one round, from
        the settings alone (``hosfl compare --budget-samples`` sizes its runs with them; the rounds
        record the measured ``samples`` and ``server-steps``). Default: one of each."""
        return 1, 1

    @classmethod
    def check_setup(cls, model: SplitModel, spec: ModelSpec, settings: S) -> None:
        """Fail with one line (:class:`~hosfl_flower.options.ConfigError`) if the protocol cannot run
        on this model with these settings; called by the strategy when it is built."""

    @abstractmethod
    def run_round(self, server_round: int, nodes: Sequence[NodeInfo], link: Link) -> dict[str, Any]:
        """Run one round's exchanges with ``nodes`` and its updates; return the round's metrics
        (``samples`` and ``server-steps`` at least; ``skipped: 1`` when the round changed nothing)."""

    def node_discovered(self, node: NodeInfo, applied_round: int) -> None:
        """Called once per new node with the round its ``θ_c`` says it is at."""

    def finish(self, nodes: Sequence[NodeInfo], link: Link) -> dict[str, Any]:
        """Called once after the last round (e.g. a final synchronisation); returns summary metrics."""
        return {}

    # ------------------------------------------------------------------ checkpoints of the protocol's own state
    def state(self) -> dict[str, Any]:
        """The protocol's own state a resumed run needs (the adapter saves the segments and the schedule)."""
        return {}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """``ValueError`` unless ``state`` (from :meth:`state`) fits; nothing is loaded."""

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Load a checked :meth:`state`."""

    # ------------------------------------------------------------------ helpers
    def enough(self, kept: Sized, exchange: str, metrics: dict[str, Any]) -> bool:
        """Whether ``kept`` meets ``min-replies``; if not, mark the round skipped (the caller changes nothing)."""
        if len(kept) >= self.run.min_replies:
            return True
        metrics["skipped"] = 1
        LOG.log(
            WARNING,
            "[%s] round skipped: %d valid %s replies, min-replies=%d",
            self.name,
            len(kept),
            exchange,
            self.run.min_replies,
        )
        return False

    def weights(self, server_round: int, num_examples: Sequence[int]) -> list[float]:
        """:meth:`ServerHooks.aggregation_weights` of the kept replies, given their numbers of examples."""
        return [float(w) for w in self.hooks.aggregation_weights(server_round, list(num_examples))]

    def screen(self, link: Link, sizes: Mapping[NodeInfo, float], what: str, bound: ReplyBound | None = None) -> set[NodeInfo]:
        """The nodes whose reply :attr:`reply_bound` (or ``bound``, for a second kind of reply with sizes
        of its own) rejects, each counted as ``out-of-bound``."""
        rejected = (bound or self.reply_bound).screen(sizes)
        for node in sorted(rejected, key=lambda n: n.partition_id):
            link.reject("out-of-bound", node, f"{what} of size {sizes[node]:.3g}")
        return rejected

    def combine_server_states(self, states: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> dict[str, Any]:
        """Per-client server copies' :meth:`SplitServer.state` dicts combined into one: ``θ_s`` by
        ``aggregation.rule`` (a copy a poisoned batch trained counts like any other reply), the optimizer
        state by the weighted mean (step counts from the first)."""
        combined = average_states(states, weights)
        combined["weights"] = self.aggregator.states([state["weights"] for state in states], weights)
        return combined

    def expected_rows(self, node: NodeInfo) -> int:
        """The rows of a node's minibatch: ``min(batch-size, its partition size)`` (a reply with other
        rows is rejected, so a node cannot raise its own aggregation weight)."""
        return min(self.run.batch_size, node.num_examples)

    def client_state(self) -> dict[str, torch.Tensor]:
        """A copy of the global ``θ_c``."""
        return {k: v.detach().clone() for k, v in self.model.client_state().items()}
