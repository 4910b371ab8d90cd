"""HERON-SFL's client part: the node's handler of ``train.heron`` (local zeroth-order training on the
auxiliary loss ``ℓ(h_a(f_c(x)), y)``, docs/protocols.md, "HERON-SFL")."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ...memory import MemoryCase
from ...models.aux_head import AuxHead, build_aux_head
from ...node.client import HOSFLClient
from ...zo import SGD, LedgerEntry, apply_entry, mix_seed, perturb_, trainable_parameters
from ..auxiliary import received_head
from ..messages import Payload, SmashedBatch
from ..registry import Handler
from .config import HeronSettings
from .messages import HeronReply, HeronRequest

DIRECTION_SALT = 0x4E50
"""Last part of a local step's direction seed ``mix_seed(seed, partition, round, step, DIRECTION_SALT)``."""


@torch.no_grad()
def local_training(client: HOSFLClient, request: HeronRequest, server_round: int) -> tuple[dict[int, SmashedBatch], AuxHead]:
    """``h`` two-point zeroth-order SGD steps on ``θ_c`` and ``θ_a`` along seeded directions.

    Step ``i``'s direction is seeded by ``(seed, partition, round, i)``; its estimate is
    ``(ℓ(θ + μu) − ℓ(θ)) / μ · u``. The unperturbed pass's smashed batch of every ``k``-th step is kept.
    Returns the kept batches by step and the trained head (on the CPU); the (shared) model holds the
    trained ``θ_c``. On a device copy the whole local training runs there and ``θ_c`` is committed back.
    """
    model, optimizer = client.compute_model(), SGD()
    head: AuxHead | None = None
    params: list[torch.Tensor] = []
    kept: dict[int, SmashedBatch] = {}
    for step in range(request.local_steps):
        batch = client.draw_batch(server_round, step)
        inputs, labels = client.to_compute(batch.inputs), client.to_compute(batch.labels)
        smashed = model.smash(inputs)
        if head is None:
            head = received_head(request, smashed["z"], model.num_classes).to(smashed["z"].device)
            params = [*model.client_parameters(), *trainable_parameters(head)]
        mask = inputs.get("attention_mask")
        loss0 = float(model.loss(head(smashed["z"], mask), labels))
        if (step + 1) % request.upload_every == 0:
            kept[step] = SmashedBatch({k: v.to("cpu") for k, v in smashed.items()}, batch.labels)
        seed = mix_seed(client.settings.seed, client.settings.partition_id, server_round, step, DIRECTION_SALT)
        perturb_(params, seed, request.mu)
        try:
            loss1 = float(model.loss(head(model.smash(inputs)["z"], mask), labels))
        finally:
            perturb_(params, seed, -request.mu)
        apply_entry(params, optimizer, LedgerEntry(step, (seed,), (loss1 - loss0,), request.lr, request.mu))
    assert head is not None  # a request has at least one local step
    client.commit()
    return kept, head.to("cpu")


def heron(client: HOSFLClient, request: HeronRequest, server_round: int) -> HeronReply:
    """Adopt the round's ``θ_c``, train locally, and reply with ``θ_c``, ``θ_a`` and the kept batches."""
    start = time.perf_counter()
    client.model.load_client_state(request.client_state)
    kept, head = local_training(client, request, server_round)
    return HeronReply(
        {k: v.detach().clone() for k, v in client.model.client_state().items()},
        head.state_dict(),
        len(client.train),
        list(kept),
        list(kept.values()),
        compute_seconds=time.perf_counter() - start,
    )


HERON_STEPS = 2
"""Zeroth-order local steps of the round the memory benchmark measures (the peak does not grow with more)."""

HANDLERS: dict[type[Payload], Handler] = {HeronRequest: heron}


def memory_step(case: MemoryCase) -> Callable[[], HeronReply]:
    """One round of a node for the memory benchmark: ``train.heron`` with ``HERON_STEPS`` local steps."""
    settings = HeronSettings.from_config(case.cfg)
    head = build_aux_head(settings.head, case.z_example, case.task.model.num_classes, case.cfg["seed"]).state_dict()
    upload_every = min(settings.upload_every, HERON_STEPS)

    def step() -> HeronReply:
        request = HeronRequest(
            case.received_weights(),
            {k: v.clone() for k, v in head.items()},
            HERON_STEPS,
            upload_every,
            settings.lr,
            settings.head,
            mu=settings.mu,
        )
        return heron(case.new_client(), request, case.server_round)

    return step
