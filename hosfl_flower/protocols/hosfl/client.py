"""HO-SFL's client part: the node's handlers of ``train.smash``, ``train.probe`` and ``query.sync``."""

from __future__ import annotations

import time

import torch

from ...node.client import HOSFLClient
from ...zo import dot64, needs_anchor
from ..messages import CatchUp, Payload, SmashedBatch
from ..registry import Handler
from .config import HOSFLSettings
from .messages import ProbeReply, ProbeRequest, SmashReply, SmashRequest, SyncReply, SyncRequest


@torch.no_grad()
def smash(client: HOSFLClient, request: SmashRequest, server_round: int) -> SmashReply:
    """Catch up, draw this round's minibatch, and return ``z = f_c(x)`` computed without gradients.

    The batch's inputs and ``z`` stay in the node state for the round's probe.
    """
    start = time.perf_counter()
    _, applied = client.catch_up(request.catch_up)
    batch = client.draw_batch(server_round)
    smashed = client.smash(batch.inputs)
    client.keep("probe", (server_round,), {**{f"input.{k}": v for k, v in batch.inputs.items()}, "z": smashed["z"]})
    return SmashReply(
        client.fingerprint(), applied, SmashedBatch(smashed, batch.labels), compute_seconds=time.perf_counter() - start
    )


@torch.no_grad()
def probe(client: HOSFLClient, request: ProbeRequest, server_round: int) -> ProbeReply:
    """One scalar ``v_p`` per seed on the kept batch, e.g. ``⟨λ, f_c(x; θ + μ u_p) − z⟩`` (``forward``).

    The estimator and the directions' distribution come with the request. ``⟨λ, z⟩`` is folded into
    one float64 scalar before any probe, so the node holds the inputs, ``λ`` and one perturbed output
    (or tangent) at a time.
    """
    start = time.perf_counter()
    tensors = client.take("probe", (server_round,))
    z = tensors.pop("z")
    lam = request.activation_grad
    if z.shape != lam.shape:
        raise ValueError(f"λ has shape {tuple(lam.shape)} but z has shape {tuple(z.shape)}")
    inputs = {k[len("input.") :]: v for k, v in tensors.items()}
    anchor = dot64(lam, z) if needs_anchor(request.estimator) else None
    del z, tensors
    client.restore()
    scalars = client.probe(request.estimator, inputs, lam, request.seeds, request.mu, anchor, request.directions)
    return ProbeReply(list(scalars), compute_seconds=time.perf_counter() - start)


def sync(client: HOSFLClient, request: SyncRequest, server_round: int) -> SyncReply:
    """Catch up without training; reply with the node's version."""
    start = time.perf_counter()
    _, applied = client.catch_up(request.catch_up)
    return SyncReply(client.fingerprint(), applied, compute_seconds=time.perf_counter() - start)


HANDLERS: dict[type[Payload], Handler] = {SmashRequest: smash, ProbeRequest: probe, SyncRequest: sync}


def memory_step(case):
    """One round of a node for the memory benchmark: ``train.smash`` replaying one entry, then ``train.probe``."""
    settings = HOSFLSettings.from_config(case.cfg)

    def step():
        client = case.new_client()
        reply = smash(client, SmashRequest(CatchUp(0, [case.previous])), case.server_round)
        del reply  # sent to the server before λ comes back
        request = ProbeRequest(case.activation_grad(), case.seeds, settings.mu, settings.estimator, settings.directions)
        return probe(client, request, case.server_round)

    return step
