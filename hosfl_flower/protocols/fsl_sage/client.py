"""FSL-SAGE's client part: the node's handler of ``train.fsl_sage`` (local first-order steps of
``θ_c`` along the auxiliary model's estimate of the cut-layer gradient, docs/protocols.md, "FSL-SAGE")."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ...models import SplitModel
from ...models.aux_head import AuxHead, build_aux_head
from ...node.client import HOSFLClient
from ..auxiliary import LocalRoundReply, received_head
from ..cse_fsl.client import sgd_step
from ..messages import Payload, SmashedBatch
from ..registry import Handler
from .config import FSLSageSettings
from .messages import FSLSageRequest

if TYPE_CHECKING:
    from ...memory import MemoryCase


def estimated_activation_grad(
    model: SplitModel, head: AuxHead, smashed: dict[str, torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """``∂ℓ(a(z), y)/∂z`` at a detached ``z``: the auxiliary model's estimate of the server's ``λ``
    (``θ_a`` gets no gradient)."""
    z = smashed["z"].detach().requires_grad_(True)
    loss = model.loss(head(z, smashed.get("attention_mask")), labels)
    (grad,) = torch.autograd.grad(loss, z)
    return grad


def local_training(client: HOSFLClient, request: FSLSageRequest, server_round: int) -> dict[int, SmashedBatch]:
    """``h`` SGD steps of ``θ_c``: ``z = f_c(x)``, ``z.backward(∂ℓ(a(z), y)/∂z)``, ``θ_c ← θ_c − lr ∇``.

    Step ``i`` draws the node's minibatch ``(round, i)``; the smashed batch of every ``k``-th step
    (before that step's update) is kept for the server. The (shared) model holds the trained ``θ_c``.
    """
    model = client.compute_model()
    head: AuxHead | None = None
    kept: dict[int, SmashedBatch] = {}
    for step in range(request.local_steps):
        batch = client.draw_batch(server_round, step)
        inputs, labels = client.to_compute(batch.inputs), client.to_compute(batch.labels)
        smashed = model.smash(inputs)
        if head is None:
            head = received_head(request, smashed["z"], model.num_classes).to(smashed["z"].device).requires_grad_(False)
        if (step + 1) % request.upload_every == 0:
            kept[step] = SmashedBatch({k: v.detach().to("cpu") for k, v in smashed.items()}, batch.labels)
        params = model.client_parameters()
        for param in params:
            param.grad = None
        smashed["z"].backward(estimated_activation_grad(model, head, smashed, labels))
        sgd_step(params, request.lr)
    client.commit()
    return kept


def fsl_sage(client: HOSFLClient, request: FSLSageRequest, server_round: int) -> LocalRoundReply:
    """Adopt the round's ``θ_c``, train locally, and reply with ``θ_c`` and the kept batches."""
    start = time.perf_counter()
    client.model.load_client_state(request.client_state)
    kept = local_training(client, request, server_round)
    return LocalRoundReply(
        {k: v.detach().clone() for k, v in client.model.client_state().items()},
        {},
        len(client.train),
        list(kept),
        list(kept.values()),
        compute_seconds=time.perf_counter() - start,
    )


HANDLERS: dict[type[Payload], Handler] = {FSLSageRequest: fsl_sage}


def memory_step(case: MemoryCase) -> Callable[[], LocalRoundReply]:
    """One round of a node for the memory benchmark: ``train.fsl_sage`` with one local step."""
    settings = FSLSageSettings.from_config(case.cfg)
    head = build_aux_head(settings.head, case.z_example, case.task.model.num_classes, case.cfg["seed"]).state_dict()

    def step() -> LocalRoundReply:
        sent_head = {k: v.clone() for k, v in head.items()}
        request = FSLSageRequest(case.received_weights(), sent_head, 1, 1, settings.lr, settings.head)
        return fsl_sage(case.new_client(), request, case.server_round)

    return step
