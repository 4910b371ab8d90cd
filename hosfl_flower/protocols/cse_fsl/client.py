"""CSE-FSL's client part: the node's handler of ``train.cse_fsl`` (local first-order training of
``θ_c`` and ``θ_a`` on the auxiliary loss ``ℓ(h_a(f_c(x)), y)``, docs/protocols.md, "CSE-FSL")."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ...models.aux_head import AuxHead, build_aux_head
from ...node.client import HOSFLClient
from ..auxiliary import LocalRoundReply, received_head
from ..messages import Payload, SmashedBatch
from ..registry import Handler
from .config import CSEFSLSettings
from .messages import CSEFSLRequest

if TYPE_CHECKING:
    from ...memory import MemoryCase


def sgd_step(params: Sequence[torch.Tensor], lr: float) -> None:
    """``p ← p − lr ∇p`` for every parameter with a gradient; the gradients are cleared."""
    with torch.no_grad():
        for param in params:
            if param.grad is not None:
                param.add_(param.grad, alpha=-lr)
                param.grad = None


def local_training(client: HOSFLClient, request: CSEFSLRequest, server_round: int) -> tuple[dict[int, SmashedBatch], AuxHead]:
    """``h`` first-order SGD steps on ``θ_c`` and ``θ_a`` of the loss ``ℓ(h_a(f_c(x)), y)``.

    Step ``i`` draws the node's minibatch ``(round, i)``; the smashed batch ``z = f_c(x)`` of every
    ``k``-th step (computed before that step's update) is kept for the server. Returns the kept
    batches by step and the trained head (on the CPU); the (shared) model holds the trained ``θ_c``.
    """
    model = client.compute_model()
    head: AuxHead | None = None
    params: list[torch.Tensor] = []
    kept: dict[int, SmashedBatch] = {}
    for step in range(request.local_steps):
        batch = client.draw_batch(server_round, step)
        inputs, labels = client.to_compute(batch.inputs), client.to_compute(batch.labels)
        smashed = model.smash(inputs)
        if head is None:
            head = received_head(request, smashed["z"], model.num_classes).to(smashed["z"].device)
            params = [*model.client_parameters(), *head.parameters()]
        if (step + 1) % request.upload_every == 0:
            kept[step] = SmashedBatch({k: v.detach().to("cpu") for k, v in smashed.items()}, batch.labels)
        for param in params:
            param.grad = None
        model.loss(head(smashed["z"], inputs.get("attention_mask")), labels).backward()
        sgd_step(params, request.lr)
    assert head is not None  # a request has at least one local step
    client.commit()
    return kept, head.to("cpu")


def cse_fsl(client: HOSFLClient, request: CSEFSLRequest, server_round: int) -> LocalRoundReply:
    """Adopt the round's ``θ_c``, train locally, and reply with ``θ_c``, ``θ_a`` and the kept batches."""
    start = time.perf_counter()
    client.model.load_client_state(request.client_state)
    kept, head = local_training(client, request, server_round)
    return LocalRoundReply(
        {k: v.detach().clone() for k, v in client.model.client_state().items()},
        {k: v.detach().clone() for k, v in head.state_dict().items()},
        len(client.train),
        list(kept),
        list(kept.values()),
        compute_seconds=time.perf_counter() - start,
    )


MEMORY_STEPS = 1
"""Local steps of the round the memory benchmark measures (one first-order step; the peak does not grow with more)."""

HANDLERS: dict[type[Payload], Handler] = {CSEFSLRequest: cse_fsl}


def memory_step(case: MemoryCase) -> Callable[[], LocalRoundReply]:
    """One round of a node for the memory benchmark: ``train.cse_fsl`` with one local step."""
    settings = CSEFSLSettings.from_config(case.cfg)
    head = build_aux_head(settings.head, case.z_example, case.task.model.num_classes, case.cfg["seed"]).state_dict()

    def step() -> LocalRoundReply:
        request = CSEFSLRequest(
            case.received_weights(), {k: v.clone() for k, v in head.items()}, MEMORY_STEPS, 1, settings.lr, settings.head
        )
        return cse_fsl(client=case.new_client(), request=request, server_round=case.server_round)

    return step
