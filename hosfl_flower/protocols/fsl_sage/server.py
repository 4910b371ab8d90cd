"""FSL-SAGE's server part (Nair et al., ICML 2025; docs/protocols.md, "FSL-SAGE").

Round ``t``: ``train.fsl_sage`` carries ``θ_c`` and the auxiliary model ``θ_a`` to the sampled nodes;
each takes ``h`` first-order steps of ``θ_c`` along ``J_cᵀ ∂ℓ(a(z), y)/∂z`` (the auxiliary model's
estimate of the server's cut-layer gradient ``λ``) and uploads the smashed batch of steps ``k−1, 2k−1,
…``. The server steps ``θ_s`` on each upload (node by node in request order), keeps the uploads (the latest
``fsl-sage.buffer-size`` examples), averages ``θ_c`` by FedAvg, and in rounds ``1, l+1, 2l+1, …``
aligns ``θ_a``: with ``λ = ∂ℓ(f_s(z), y)/∂z`` from the current ``θ_s`` on every stored batch, it takes
``fsl-sage.align-epochs`` passes of Adam steps on ``Σ (∂ℓ(a(z), y)/∂z − λ)²``, one step per batch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...checkpoint import CheckpointError, check_tensor, check_tensors
from ..auxiliary import AuxiliaryServer, LocalRoundReply
from ..base import Link, NodeInfo
from ..messages import SmashedBatch
from .client import estimated_activation_grad
from .config import FSLSageSettings
from .messages import FSLSageRequest

LABELS = "labels"
"""Key of a stored batch's labels next to its smashed tensors (in the checkpoint's buffer)."""


class FSLSageServer(AuxiliaryServer):
    """FSL-SAGE; ``self.aux_head`` is the global auxiliary model ``θ_a``, trained only by alignment;
    ``self.buffer`` the stored uploads."""

    name = "fsl-sage"
    settings: FSLSageSettings

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.buffer: list[SmashedBatch] = []

    def request(self, server_round: int) -> FSLSageRequest:
        """``train.fsl_sage`` with the global ``θ_c``, the current ``θ_a`` and the local-training settings."""
        s = self.settings
        return FSLSageRequest(self.client_state(), self.head_state(), s.local_steps, s.upload_every, s.lr, s.head)

    def after_server_steps(self, server_round: int, replies: Mapping[NodeInfo, LocalRoundReply], link: Link) -> dict[str, Any]:
        """Store the round's uploads; align ``θ_a`` in rounds ``1, l+1, 2l+1, …``."""
        for reply in replies.values():
            self.store(reply.batches)
        if (server_round - 1) % self.settings.align_every != 0:
            return {}
        loss, seconds = self.align()
        link.account.server_seconds += seconds
        # An alignment changes the scale of the estimate, so of the nodes' next updates (λ grows as θ_s
        # learns): the reply bound starts its history again, else every honest reply could exceed it.
        self.reply_bound.history.clear()
        return {"align-loss": loss}

    def store(self, batches: Sequence[SmashedBatch]) -> None:
        """Append ``batches``; drop the oldest while more than ``buffer-size`` examples are kept (the newest stays)."""
        self.buffer.extend(batches)
        while len(self.buffer) > 1 and sum(b.num_examples for b in self.buffer) > self.settings.buffer_size:
            self.buffer.pop(0)

    def true_activation_grads(self) -> list[torch.Tensor]:
        """``λ = ∂ℓ(f_s(z), y)/∂z`` of every stored batch under the current ``θ_s`` (which does not change)."""
        grads = []
        for batch in self.buffer:
            result = self.split_server.step([(batch.smashed, batch.labels)], [1.0], apply=False)
            self.split_server.discard_pending()
            grads.append(result.activation_grads[0])
        return grads

    def align(self) -> tuple[float, float]:
        """Fit ``θ_a``'s gradient to the server's on the stored batches; returns the last pass's mean
        alignment loss and the seconds it took."""
        start = time.perf_counter()
        targets = self.true_activation_grads()
        params = list(self.aux_head.parameters())
        optimizer = torch.optim.Adam(params, lr=self.settings.align_lr)
        losses: list[float] = []
        for _ in range(self.settings.align_epochs):
            losses = []
            for batch, target in zip(self.buffer, targets):
                optimizer.zero_grad(set_to_none=True)
                z = batch.smashed["z"].detach().requires_grad_(True)
                head_loss = self.model.loss(self.aux_head(z, batch.smashed.get("attention_mask")), batch.labels)
                (estimate,) = torch.autograd.grad(head_loss, z, create_graph=True)
                loss = ((estimate - target) ** 2).sum()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses), time.perf_counter() - start

    def alignment_error(self) -> float:
        """``Σ (∂ℓ(a(z), y)/∂z − λ)²`` over the stored batches, as :meth:`align` minimises it (for analysis)."""
        total = 0.0
        for batch, target in zip(self.buffer, self.true_activation_grads()):
            estimate = estimated_activation_grad(self.model, self.aux_head, batch.smashed, batch.labels)
            total += float(((estimate - target) ** 2).sum())
        return total

    # ------------------------------------------------------------------ checkpoints: θ_a and the stored uploads
    def state(self) -> dict[str, Any]:
        buffer = [{**{k: v.clone() for k, v in b.smashed.items()}, LABELS: b.labels.clone()} for b in self.buffer]
        return {"aux-head": self.head_state(), "buffer": buffer}

    def check_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or set(state) != {"aux-head", "buffer"}:
            got = sorted(state, key=str) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"expected exactly ['aux-head', 'buffer'], got {got}")
        check_tensors("auxiliary head", state["aux-head"], self.aux_head.state_dict())
        buffer = state["buffer"]
        if not isinstance(buffer, list):
            raise CheckpointError(f"checkpoint's stored uploads are {type(buffer).__name__}, expected a list")
        expected = {*self.spec.smashed_layout, LABELS} if self.spec.smashed_layout else {"z", LABELS}
        for index, batch in enumerate(buffer):
            if not isinstance(batch, Mapping) or set(batch) != expected:
                raise CheckpointError(f"checkpoint's stored upload {index} is not a batch of {sorted(expected)}")
            for key, tensor in batch.items():
                if not isinstance(tensor, torch.Tensor):
                    raise CheckpointError(f"checkpoint's stored upload {index}.{key} is {type(tensor).__name__}")
                check_tensor(f"checkpoint's stored upload {index}.{key}", tensor)

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.aux_head.load_state_dict(state["aux-head"])
        self.buffer = [SmashedBatch({k: v for k, v in batch.items() if k != LABELS}, batch[LABELS]) for batch in state["buffer"]]
