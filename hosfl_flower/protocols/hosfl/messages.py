"""HO-SFL's messages: ``train.smash`` (catch-up down; ``z``, ``y`` and the node's version up),
``train.probe`` (``λ``, seeds, ``μ``, estimator, directions down; ``P`` scalars up) and
``query.sync`` (catch-up down; the node's version up). docs/protocols.md, "HO-SFL"."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from ...zo import DISTRIBUTIONS, ESTIMATORS
from ..messages import (
    MAX_LIST,
    MAX_SEED,
    CatchUp,
    ModelSpec,
    Payload,
    Reply,
    ReplyError,
    SmashedBatch,
    activation_grad_record,
    compute_seconds,
    read_activation_grad,
    require_int,
    require_int_list,
    require_number,
    require_record,
    require_scalars,
    require_str,
)

FINGERPRINT_LENGTH = 64
"""Longest fingerprint a reply may carry (a node's is 32 hex digits)."""


@dataclass
class SmashRequest(Payload):
    """``train.smash``: bring ``θ_c`` up to date, then smash this round's batch."""

    catch_up: CatchUp = field(default_factory=CatchUp)

    message_type: ClassVar[str] = "train.smash"
    categories: ClassVar[Mapping[str, str]] = CatchUp.categories

    def to_record(self) -> RecordDict:
        return RecordDict(self.catch_up.records())

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> SmashRequest:
        return cls(CatchUp.read(content))


@dataclass
class VersionedReply(Reply):
    """A reply that names the version of ``θ_c`` the node is at after catching up."""

    fingerprint: str = ""
    applied_round: int = 0

    @staticmethod
    def read_version(content: RecordDict) -> tuple[ConfigRecord, str, int]:
        """``meta`` with its ``fingerprint`` (a short string) and ``applied-round`` (``>= 0``)."""
        meta = require_record(content, "meta", ConfigRecord)
        return meta, require_str(meta, "fingerprint", max_length=FINGERPRINT_LENGTH), require_int(meta, "applied-round")


@dataclass
class SmashReply(VersionedReply):
    """``z = f_c(x)`` (and companions), the labels, and the node's version."""

    batch: SmashedBatch = field(default_factory=lambda: SmashedBatch({}, torch.zeros(0, dtype=torch.long)))

    categories: ClassVar[Mapping[str, str]] = {"smashed": "activations_up", "labels": "labels_up", "meta": "other"}

    @property
    def num_examples(self) -> int:
        return self.batch.num_examples

    def to_record(self) -> RecordDict:
        meta = self.meta(fingerprint=self.fingerprint, **{"applied-round": self.applied_round, "num-examples": self.num_examples})
        return RecordDict({**self.batch.records(), "meta": meta})

    @classmethod
    def from_record(cls, content, request=None, spec: ModelSpec | None = None) -> SmashReply:
        return cls.read_smash(content, spec)

    @classmethod
    def read_smash(cls, content: RecordDict, spec: ModelSpec | None, extra: tuple[str, ...] = ()) -> SmashReply:
        """The versioned batch (``extra``: more tensors in ``smashed``, each shaped like ``z``)."""
        meta, fp, applied = cls.read_version(content)
        batch = SmashedBatch.read(content, spec, extra=extra)
        if require_int(meta, "num-examples", minimum=1) != batch.num_examples:
            raise ReplyError("wrong-count", "num-examples disagrees with the labels")
        return SmashReply(fp, applied, batch, compute_seconds=compute_seconds(meta))


@dataclass
class ProbeReply(Reply):
    """``v_p`` for each of the round's seeds."""

    scalars: list[float] = field(default_factory=list)

    categories: ClassVar[Mapping[str, str]] = {"scalars": "scalars_up", "meta": "other"}
    lie_field: ClassVar[str | None] = "scalars"
    attack_fields: ClassVar[tuple[str, ...]] = ("scalars",)

    def to_record(self) -> RecordDict:
        return RecordDict({"scalars": MetricRecord({"values": [float(v) for v in self.scalars]}), "meta": self.meta()})

    @classmethod
    def from_record(cls, content, request: ProbeRequest | None = None, spec=None) -> ProbeReply:
        scalars = require_record(content, "scalars", MetricRecord)
        values = scalars.get("values")
        count = len(request.seeds) if request is not None else len(values) if isinstance(values, list) else 1
        meta = require_record(content, "meta", ConfigRecord)
        return cls(require_scalars(scalars, "values", count), compute_seconds=compute_seconds(meta))


@dataclass
class ProbeRequest(Payload):
    """``train.probe``: ``λ_n`` and how to probe (the server chooses, as it chooses the ledger entry's)."""

    activation_grad: torch.Tensor
    seeds: tuple[int, ...]
    mu: float
    estimator: str = "forward"
    directions: str = "gaussian"

    message_type: ClassVar[str] = "train.probe"
    reply_type: ClassVar[type[Payload] | None] = ProbeReply
    categories: ClassVar[Mapping[str, str]] = {"activation-grad": "activation_grads_down", "seeds": "seeds_and_ledger_down"}

    def to_record(self) -> RecordDict:
        seeds = ConfigRecord(
            {"seeds": list(self.seeds), "mu": self.mu, "estimator": self.estimator, "directions": self.directions}
        )
        return RecordDict({"activation-grad": activation_grad_record(self.activation_grad), "seeds": seeds})

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> ProbeRequest:
        seeds = require_record(content, "seeds", ConfigRecord)
        lam, mu = read_activation_grad(content), require_number(seeds, "mu", positive=True)
        estimator = require_str(seeds, "estimator", ESTIMATORS, default="forward")
        directions = require_str(seeds, "directions", DISTRIBUTIONS, default="gaussian")
        return cls(lam, tuple(require_int_list(seeds, "seeds", maximum=MAX_SEED, max_length=MAX_LIST)), mu, estimator, directions)


@dataclass
class SyncReply(VersionedReply):
    """The node's version after a ``query.sync``."""

    categories: ClassVar[Mapping[str, str]] = {"meta": "other"}

    def to_record(self) -> RecordDict:
        return RecordDict({"meta": self.meta(fingerprint=self.fingerprint, **{"applied-round": self.applied_round})})

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> SyncReply:
        meta, fp, applied = cls.read_version(content)
        return cls(fp, applied, compute_seconds=compute_seconds(meta))


@dataclass
class SyncRequest(SmashRequest):
    """``query.sync``: catch up without training (the final synchronisation)."""

    message_type: ClassVar[str] = "query.sync"
    reply_type: ClassVar[type[Payload] | None] = SyncReply


SmashRequest.reply_type = SmashReply
