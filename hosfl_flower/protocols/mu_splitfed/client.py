"""MU-SplitFed's client part: the node's handlers of ``train.mu_smash`` and ``train.mu_step``.

Between the messages of a round the node keeps its current ``θ_c`` in its weight store, as SplitFed's
nodes do (:func:`~hosfl_flower.protocols.splitfed.client.keep_weights`); a step needs no kept inputs,
since ``θ_c`` moves along the seeded directions ``v_p`` by the scalars the server sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ...node.client import HOSFLClient
from ...zo import perturb_
from ..messages import Payload, SmashedBatch
from ..registry import Handler
from ..splitfed.client import keep_weights, load_weights
from .config import MUSplitFedSettings
from .messages import MUSmashReply, MUSmashRequest, MUStepReply, MUStepRequest

if TYPE_CHECKING:
    from ...memory import MemoryCase


@torch.no_grad()
def mu_smash(client: HOSFLClient, request: MUSmashRequest, server_round: int) -> MUSmashReply:
    """Adopt the round's ``θ_c`` if sent, draw step ``request.step``'s minibatch, and return ``z`` at
    ``θ_c`` and ``z±_p`` at ``θ_c ± μ v_p`` for each seed."""
    start = time.perf_counter()
    if request.weights is not None:
        client.model.load_client_state(request.weights)
        keep_weights(client, server_round)
    else:
        load_weights(client, server_round)
    batch = client.draw_batch(server_round, request.step)
    smashed = client.smash(batch.inputs)
    params = client.model.client_parameters()  # the canonical θ_c, perturbed on the CPU
    plus, minus = [], []
    for seed in request.seeds:
        perturb_(params, seed, request.mu)
        try:
            plus.append(client.smash(batch.inputs)["z"])
            perturb_(params, seed, -2.0 * request.mu)
            minus.append(client.smash(batch.inputs)["z"])
        finally:
            perturb_(params, seed, request.mu)
    keep_weights(client, server_round)  # the restored θ_c (its last bits may differ from the one received)
    return MUSmashReply(SmashedBatch(smashed, batch.labels), plus, minus, compute_seconds=time.perf_counter() - start)


@torch.no_grad()
def mu_step(client: HOSFLClient, request: MUStepRequest, server_round: int) -> MUStepReply:
    """``θ_c ← θ_c − lr/P Σ_p g_p v_p``; after the round's last step, reply with ``θ_c``."""
    start = time.perf_counter()
    load_weights(client, server_round)
    params = client.model.client_parameters()
    for seed, scalar in zip(request.seeds, request.scalars):
        perturb_(params, seed, -request.lr * scalar / len(request.seeds))
    weights = None
    if request.last:
        weights = {k: v.clone() for k, v in client.model.client_state().items()}
    else:
        keep_weights(client, server_round)
    return MUStepReply(weights, compute_seconds=time.perf_counter() - start)


HANDLERS: dict[type[Payload], Handler] = {MUSmashRequest: mu_smash, MUStepRequest: mu_step}


def memory_step(case: MemoryCase) -> Callable[[], MUStepReply]:
    """One MU-SplitFed step of a node for the memory benchmark: ``train.mu_smash`` receiving ``θ_c``,
    then ``train.mu_step`` (the round's last step)."""
    settings = MUSplitFedSettings.from_config(case.cfg)
    seeds = tuple(range(1, settings.num_perturbations + 1))

    def step() -> MUStepReply:
        client = case.new_client()
        reply = mu_smash(client, MUSmashRequest(0, seeds, settings.mu, case.received_weights()), case.server_round)
        del reply  # sent to the server before the scalars come back
        scalars = tuple(0.1 for _ in seeds)
        return mu_step(client, MUStepRequest(0, seeds, scalars, settings.client_lr, True), case.server_round)

    return step
