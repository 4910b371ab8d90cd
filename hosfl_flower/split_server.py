"""The split server: owns ``θ_s`` and its optimizer, and takes first-order steps on smashed batches."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .models import Smashed, SplitModel


def make_server_optimizer(
    name: str, params: Sequence[torch.nn.Parameter], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The server's first-order optimizer (``sgd`` with momentum, or ``adamw``)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=False)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)
    raise ValueError(f"unknown server optimizer {name!r}; allowed: sgd, adamw")


@dataclass
class StepResult:
    """What one server step returns: the weighted loss, ``λ_n`` per batch, and compute seconds."""

    loss: float
    activation_grads: list[torch.Tensor]
    seconds: float


class SplitServer:
    """``θ_s``, its optimizer and the first-order step over a round's smashed batches.

    ``step`` computes ``loss = Σ_n w_n ℓ(f_s(z_n), y_n)``, takes one optimizer step on ``θ_s``, and
    returns ``λ_n = ∂loss/∂z_n`` for every batch. The same class runs in the ServerApp process
    (default) or as a Ray actor (:func:`ray_split_server`).
    """

    def __init__(
        self,
        model: SplitModel,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        num_threads: int | None = None,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.model = model
        self.optimizer = make_server_optimizer(optimizer, model.server_parameters(), lr, momentum, weight_decay)

    def step(
        self, batches: Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor]], weights: Sequence[float]
    ) -> StepResult:
        """One first-order step on ``θ_s`` over ``batches`` (smashed dict, labels) weighted by ``weights``."""
        if len(batches) != len(weights):
            raise ValueError(f"{len(batches)} batches but {len(weights)} weights")
        start = time.perf_counter()
        self.model.server.train()
        self.optimizer.zero_grad(set_to_none=True)
        leaves: list[torch.Tensor] = []
        total = torch.zeros((), dtype=torch.float32)
        for (smashed, labels), weight in zip(batches, weights):
            z = smashed["z"].detach().clone().requires_grad_(True)
            leaves.append(z)
            logits = self.model.head({**smashed, "z": z})
            total = total + weight * self.model.loss(logits, labels)
        if leaves:
            total.backward()
            self.optimizer.step()
        self.model.server.eval()
        grads = [z.grad if z.grad is not None else torch.zeros_like(z) for z in leaves]
        return StepResult(float(total.detach()), grads, time.perf_counter() - start)

    def server_weights(self) -> dict[str, torch.Tensor]:
        """The server segment's state dict (weights and buffers)."""
        return {k: v.detach().clone() for k, v in self.model.server.state_dict().items()}

    def optimizer_state(self) -> dict:
        """The server optimizer's state dict."""
        return self.optimizer.state_dict()


class RaySplitServer:
    """A :class:`SplitServer` running as a Ray actor, behind the same interface.

    Only for Flower's simulation engine, where Ray is already running in the ServerApp's process:
    this waits for the engine to initialise Ray and never calls ``ray.init`` itself. The actor
    reserves no CPU (``num_cpus=0``) because the client actor pool takes them all, and uses as many
    torch threads as the creating process so that its arithmetic matches the in-process placement bit for bit.
    """

    def __init__(self, model: SplitModel, wait_seconds: float = 120.0, **optimizer_kwargs) -> None:
        import ray

        deadline = time.monotonic() + wait_seconds
        while not ray.is_initialized():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "split-server.placement='ray' needs Flower's simulation engine (Ray was not initialised)"
                )
            time.sleep(0.05)
        actor_class = ray.remote(num_cpus=0)(SplitServer)
        self._ray = ray
        optimizer_kwargs.setdefault("num_threads", torch.get_num_threads())
        self._actor = actor_class.remote(model, **optimizer_kwargs)

    def step(self, batches, weights) -> StepResult:
        return self._ray.get(self._actor.step.remote(list(batches), list(weights)))

    def server_weights(self) -> dict[str, torch.Tensor]:
        return self._ray.get(self._actor.server_weights.remote())

    def optimizer_state(self) -> dict:
        return self._ray.get(self._actor.optimizer_state.remote())

    def close(self) -> None:
        """Stop the actor."""
        self._ray.kill(self._actor)


def build_split_server(model: SplitModel, placement: str, **optimizer_kwargs) -> SplitServer | RaySplitServer:
    """A split server in this process (``local``) or as a Ray actor (``ray``)."""
    if placement == "local":
        return SplitServer(model, **optimizer_kwargs)
    if placement == "ray":
        return RaySplitServer(model, **optimizer_kwargs)
    raise ValueError(f"unknown split-server placement {placement!r}; allowed: local, ray")
