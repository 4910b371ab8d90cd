"""ZO-SFL's messages: ``train.zo_smash`` (catch-up, the round's seeds and ``μ`` down; ``z`` at ``θ_c``,
``z̃_p`` at ``θ_c + μ u_p``, ``y`` and the node's version up). The final synchronisation is HO-SFL's
``query.sync``. docs/protocols.md, "ZO-SFL"."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from ..hosfl.messages import SmashReply
from ..messages import (
    MAX_SEED,
    CatchUp,
    ModelSpec,
    Payload,
    ReplyError,
    SmashedBatch,
    require_int_list,
    require_number,
    require_record,
)

PERTURBED_PREFIX = "z~"
"""``smashed`` holds ``z̃_p`` under ``z~<p>``, next to ``z``."""


@dataclass
class ZOSmashReply(SmashReply):
    """HO-SFL's versioned smash reply plus ``z̃_p`` for each of the round's seeds."""

    perturbed: list[torch.Tensor] = field(default_factory=list)

    lie_field: ClassVar[str | None] = "batch"
    attack_fields: ClassVar[tuple[str, ...]] = ("perturbed",)

    def to_record(self) -> RecordDict:
        tildes = {f"{PERTURBED_PREFIX}{p}": z for p, z in enumerate(self.perturbed)}
        meta = self.meta(fingerprint=self.fingerprint, **{"applied-round": self.applied_round, "num-examples": self.num_examples})
        return RecordDict({**SmashedBatch({**self.batch.smashed, **tildes}, self.batch.labels).records(), "meta": meta})

    @classmethod
    def from_record(cls, content, request: ZOSmashRequest | None = None, spec: ModelSpec | None = None) -> ZOSmashReply:
        """As HO-SFL's smash reply, plus exactly ``P`` perturbed activations of ``z``'s dtype and shape."""
        record = require_record(content, "smashed", ArrayRecord)
        count = len(request.seeds) if request is not None else sum(k.startswith(PERTURBED_PREFIX) for k in record)
        names = tuple(f"{PERTURBED_PREFIX}{p}" for p in range(count))
        if {k for k in record if k.startswith(PERTURBED_PREFIX)} != set(names):
            raise ReplyError("wrong-count", f"expected exactly {count} perturbed activations")
        reply = SmashReply.read_smash(content, spec, names)
        smashed = reply.batch.smashed
        tildes = [smashed.pop(name) for name in names]
        z = smashed["z"]
        if any(t.dtype != z.dtype for t in tildes):
            raise ReplyError("wrong-dtype", "perturbed activations differ from z in dtype")
        if any(t.shape != z.shape for t in tildes):
            raise ReplyError("wrong-shape", "perturbed activations differ from z in shape")
        return cls(reply.fingerprint, reply.applied_round, reply.batch, tildes, compute_seconds=reply.compute_seconds)


@dataclass
class ZOSmashRequest(Payload):
    """``train.zo_smash``: bring ``θ_c`` up to date, then smash this round's batch at ``θ_c`` and at ``θ_c + μ u_p``."""

    catch_up: CatchUp
    seeds: tuple[int, ...]
    mu: float

    message_type: ClassVar[str] = "train.zo_smash"
    reply_type: ClassVar[type[Payload] | None] = ZOSmashReply
    categories: ClassVar[Mapping[str, str]] = {**CatchUp.categories, "seeds": "seeds_and_ledger_down"}

    def to_record(self) -> RecordDict:
        return RecordDict({**self.catch_up.records(), "seeds": ConfigRecord({"seeds": list(self.seeds), "mu": self.mu})})

    @classmethod
    def from_record(cls, content, request=None, spec=None) -> ZOSmashRequest:
        seeds = require_record(content, "seeds", ConfigRecord)
        values = tuple(require_int_list(seeds, "seeds", maximum=MAX_SEED))
        return cls(CatchUp.read(content), values, require_number(seeds, "mu", positive=True))
