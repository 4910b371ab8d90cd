"""ZO-SFL's client part: the node's handler of ``train.zo_smash`` (``query.sync`` is HO-SFL's)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ...memory import MemoryCase
from ...node.client import HOSFLClient
from ...zo import perturb_
from ..hosfl.client import sync
from ..hosfl.messages import SyncRequest
from ..messages import CatchUp, Payload, SmashedBatch
from ..registry import Handler
from .config import ZOSFLSettings
from .messages import ZOSmashReply, ZOSmashRequest


@torch.no_grad()
def zo_smash(client: HOSFLClient, request: ZOSmashRequest, server_round: int) -> ZOSmashReply:
    """Catch up, draw this round's minibatch, and return ``z`` at ``θ_c`` and ``z̃_p`` at ``θ_c + μ u_p`` per seed."""
    start = time.perf_counter()
    _, applied = client.catch_up(request.catch_up)
    batch = client.draw_batch(server_round)
    smashed = client.smash(batch.inputs)
    fp = client.fingerprint()
    params = client.model.client_parameters()  # the canonical θ_c, perturbed on the CPU
    perturbed = []
    for seed in request.seeds:
        perturb_(params, seed, request.mu)
        try:
            perturbed.append(client.smash(batch.inputs)["z"])
        finally:
            perturb_(params, seed, -request.mu)
    return ZOSmashReply(fp, applied, SmashedBatch(smashed, batch.labels), perturbed, compute_seconds=time.perf_counter() - start)


HANDLERS: dict[type[Payload], Handler] = {ZOSmashRequest: zo_smash, SyncRequest: sync}


def memory_step(case: MemoryCase) -> Callable[[], ZOSmashReply]:
    """One round of a node for the memory benchmark: ``train.zo_smash`` replaying one ledger entry."""
    settings = ZOSFLSettings.from_config(case.cfg)

    def step() -> ZOSmashReply:
        request = ZOSmashRequest(CatchUp(0, [case.previous]), case.seeds, settings.mu)
        return zo_smash(case.new_client(), request, case.server_round)

    return step
