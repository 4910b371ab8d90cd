"""The split server: owns ``θ_s`` and its optimizer, and takes first-order steps on smashed batches.

On a device other than the CPU (``split-server.device``) it keeps ``θ_s`` and its optimizer there, on
its own copy of the server segment: batches move to it, ``λ`` comes back as CPU float32, and
:meth:`SplitServer.state` is CPU tensors (docs/protocols.md, "Devices").
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from .devices import PRECISIONS, autocast, segment_copy
from .models import SplitModel
from .zo import SGD, LedgerEntry, apply_entry, perturb_

SERVER_OPTIMIZERS = ("sgd", "adamw")
PLACEMENTS = ("local", "ray")
"""Where the split server runs: in the ServerApp's process, or as a Ray actor."""


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


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``tensor`` (``clone`` when it is on the CPU already)."""
    return tensor.detach().clone() if tensor.is_cpu else tensor.detach().to("cpu")


def _cpu_tree(value: Any) -> Any:
    """``copy.deepcopy`` of ``value`` with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return _cpu_copy(value)
    if isinstance(value, Mapping):
        return {k: _cpu_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_tree(v) for v in value)
    return copy.deepcopy(value)


class SplitServer:
    """``θ_s``, its optimizer and the first-order step over a round's smashed batches.

    ``step`` computes ``loss = Σ_n w_n ℓ(f_s(z_n), y_n)``, takes one optimizer step on ``θ_s``, and
    returns ``λ_n = ∂loss/∂z_n`` for every batch. The model stays in eval mode (no dropout), so a
    step is a deterministic function of its inputs. The same class runs in the ServerApp process
    (default) or as a Ray actor (:class:`RaySplitServer`).

    On the CPU it steps ``model``'s own server segment. On another ``device`` (or with ``detach``) it
    steps a copy of it (:func:`~hosfl_flower.devices.segment_copy`) and :attr:`detached` is true: the
    caller's ``model`` gets ``θ_s`` back through :func:`sync_server_segment`. ``precision`` (``fp32``,
    ``bf16``, ``fp16``) autocasts the forward and backward of :meth:`step`; ``fp16`` scales the loss
    (``torch.amp.GradScaler``), ``λ`` is unscaled, and a step whose gradients overflow is skipped with
    ``λ = 0``.
    """

    def __init__(
        self,
        model: SplitModel,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        num_threads: int | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        detach: bool | None = None,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"fp16 autocast needs a CUDA device, not {device!r} (on the CPU, use bf16)")
        self.precision = precision
        self.detached = self.device.type != "cpu" if detach is None else bool(detach)
        self.model = segment_copy(model, "server", self.device) if self.detached else model
        self.settings: dict[str, Any] = {
            "optimizer": optimizer,
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "device": device,
            "precision": precision,
        }
        self.optimizer = make_server_optimizer(optimizer, self.model.server_parameters(), lr, momentum, weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    def ready(self) -> str:
        """The device this server computes on (a Ray actor answers once it is placed)."""
        return str(self.device)

    def _to_device(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in tensors.items()}

    def step(
        self,
        batches: Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor]],
        weights: Sequence[float],
        apply: bool = True,
    ) -> StepResult:
        """One first-order step on ``θ_s`` over ``batches`` (smashed dict, labels) weighted by ``weights``.

        With ``apply=False`` the gradients are computed (and ``λ_n`` returned) but the optimizer step
        waits for :meth:`apply_pending` or is dropped by :meth:`discard_pending`, so a round can still
        be skipped without changing ``θ_s``. ``λ_n`` are CPU float32 tensors.
        """
        if len(batches) != len(weights):
            raise ValueError(f"{len(batches)} batches but {len(weights)} weights")
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        leaves: list[torch.Tensor] = []
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for (smashed, labels), weight in zip(batches, weights):
            z = smashed["z"].detach().to(self.device, copy=True).requires_grad_(True)
            leaves.append(z)
            with autocast(self.device, self.precision):
                logits = self.model.head({**self._to_device(smashed), "z": z})
            total = total + weight * self.model.loss(logits.float(), labels.to(self.device))
        if leaves:
            (self.scaler.scale(total) if self.scaler is not None else total).backward()
            if apply:
                self._optimizer_step()
        grads = [z.grad if z.grad is not None else torch.zeros_like(z) for z in leaves]
        if self.scaler is not None:
            grads = [g / self.scaler.get_scale() for g in grads]
            if not all(bool(torch.isfinite(g).all()) for g in grads):  # overflow: the scaler skips the step
                grads = [torch.zeros_like(g) for g in grads]
        grads = [g.to("cpu", torch.float32) for g in grads]
        return StepResult(float(total.detach()), grads, time.perf_counter() - start)

    def _optimizer_step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def apply_pending(self) -> None:
        """Take the optimizer step whose gradients a ``step(..., apply=False)`` left on ``θ_s``."""
        self._optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard_pending(self) -> None:
        """Drop the gradients of a ``step(..., apply=False)``: ``θ_s`` and the optimizer stay as they were."""
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def zo_differences(
        self,
        batches: Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor]],
        perturbed: Sequence[Sequence[torch.Tensor]],
        seeds: Sequence[int],
        mu: float,
        offset: int,
    ) -> tuple[list[float], list[list[float]], float]:
        """ZO-SFL's server probe: two-point loss differences along the shared directions, per batch.

        For direction ``p`` the server perturbs ``θ_s`` by ``μ u_p`` (its values continue the seed's stream
        after the client's ``offset = d_c`` ones, so ``u_p`` is one direction over both segments) and
        compares ``ℓ(f_s(z̃_p; θ_s + μ u_p))`` with ``ℓ(f_s(z; θ_s))``. Returns each batch's loss at
        ``(θ_c, θ_s)``, each batch's differences ``L1 − L0`` (one list of ``P`` per batch) and compute
        seconds; ``θ_s`` is left as it was (:meth:`zo_apply` takes the step). Always float32: a
        difference at ``μ`` is below bfloat16's resolution.
        """
        start = time.perf_counter()
        params = self.model.server_parameters()
        batches = [(self._to_device(smashed), labels.to(self.device)) for smashed, labels in batches]
        perturbed = [[t.to(self.device) for t in tilde] for tilde in perturbed]
        anchors = [float(self.model.loss(self.model.head(smashed), labels)) for smashed, labels in batches]
        differences: list[list[float]] = [[] for _ in batches]
        for p, seed in enumerate(seeds):
            perturb_(params, seed, mu, offset)
            try:
                for index, ((smashed, labels), tilde, anchor) in enumerate(zip(batches, perturbed, anchors)):
                    loss = float(self.model.loss(self.model.head({**smashed, "z": tilde[p]}), labels))
                    differences[index].append(loss - anchor)
            finally:
                perturb_(params, seed, -mu, offset)
        return anchors, differences, time.perf_counter() - start

    def zo_apply(self, seeds: Sequence[int], scalars: Sequence[float], lr: float, mu: float, offset: int) -> None:
        """``θ_s`` takes the SGD step ``−lr/(P μ) Σ_p v̄_p u_p`` that the clients take on ``θ_c``."""
        entry = LedgerEntry(0, tuple(seeds), tuple(scalars), lr, mu)
        apply_entry(self.model.server_parameters(), SGD(), entry, offset)

    @torch.no_grad()
    def zo_central_step(
        self, smashed: Mapping[str, torch.Tensor], labels: torch.Tensor, seeds: Sequence[int], mu: float, lr: float
    ) -> tuple[list[float], float]:
        """MU-SplitFed's server step on one smashed batch: ``g_p = (ℓ(θ_s + μu_p) − ℓ(θ_s − μu_p)) / 2μ``
        along the direction of each seed, then ``θ_s ← θ_s − lr/P Σ_p g_p u_p``. Returns the ``g_p`` and
        compute seconds."""
        start = time.perf_counter()
        params = self.model.server_parameters()
        smashed, labels = self._to_device(smashed), labels.to(self.device)
        estimates = []
        for seed in seeds:
            perturb_(params, seed, mu)
            try:
                plus = float(self.model.loss(self.model.head(smashed), labels))
                perturb_(params, seed, -2.0 * mu)
                minus = float(self.model.loss(self.model.head(smashed), labels))
            finally:
                perturb_(params, seed, mu)
            estimates.append((plus - minus) / (2.0 * mu))
        for seed, estimate in zip(seeds, estimates):
            perturb_(params, seed, -lr * estimate / len(seeds))
        return estimates, time.perf_counter() - start

    @torch.no_grad()
    def losses(self, batches: Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor]]) -> tuple[list[float], float]:
        """``ℓ(f_s(z), y)`` of each batch under the current ``θ_s`` (float32), and compute seconds."""
        start = time.perf_counter()
        values = [float(self.model.loss(self.model.head(self._to_device(z)), y.to(self.device))) for z, y in batches]
        return values, time.perf_counter() - start

    def server_weights(self) -> dict[str, torch.Tensor]:
        """The server segment's state dict (weights and buffers), as CPU tensors."""
        return {k: _cpu_copy(v) for k, v in self.model.server.state_dict().items()}

    def state(self) -> dict:
        """Weights and optimizer state together, as CPU tensors (what a copy or a checkpoint needs)."""
        optimizer = self.optimizer.state_dict()
        return {
            "weights": self.server_weights(),
            "optimizer": _cpu_tree(optimizer) if self.detached else copy.deepcopy(optimizer),
        }

    def load_state(self, state: Mapping) -> None:
        """Restore :meth:`state` (CPU tensors are moved to this server's device)."""
        self.model.server.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))

    def copies(self, count: int) -> list[SplitServer]:
        """``count`` independent copies of ``θ_s`` and its optimizer (SplitFed V1's per-client servers)."""
        state = self.state()
        result = []
        for _ in range(count):
            if self.detached:
                twin = SplitServer(self.model, **self.settings, detach=True)
            else:
                twin = SplitServer(copy.deepcopy(self.model), **self.settings)
            twin.load_state(state)
            result.append(twin)
        return result


def sync_server_segment(server: SplitServer | RaySplitServer, model: SplitModel) -> None:
    """Copy ``θ_s`` into ``model`` from a split server that steps its own copy (a device, a Ray actor)."""
    if getattr(server, "detached", False):
        model.server.load_state_dict(server.server_weights())


def average_states(states: Sequence[Mapping], weights: Sequence[float]) -> dict:
    """Weighted average of :meth:`SplitServer.state` dicts: weights and floating optimizer state
    (moments) are averaged; step counts and hyper-parameters come from the first."""
    total = float(sum(weights))
    shares = [w / total for w in weights]

    def mix(values: Sequence):
        first = values[0]
        if isinstance(first, torch.Tensor) and first.is_floating_point():
            out = first * shares[0]
            for value, share in zip(values[1:], shares[1:]):
                out = out + value * share
            return out
        if isinstance(first, Mapping):
            return {k: copy.deepcopy(first[k]) if k == "step" else mix([v[k] for v in values]) for k in first}
        if isinstance(first, list):
            return [mix([v[i] for v in values]) for i in range(len(first))]
        return copy.deepcopy(first)

    return mix(list(states))


class RaySplitServer:
    """A :class:`SplitServer` running as a Ray actor, behind the same interface.

    Without ``ray_address`` it runs under Flower's simulation engine, where Ray is already running in
    the ServerApp's process: it waits for the engine to initialise Ray and never calls ``ray.init``
    itself. With ``ray_address`` (``split-server.ray-address``, e.g. ``127.0.0.1:6379`` or ``auto``) it
    connects the process to that existing cluster if Ray is not initialised yet (Flower's deployment
    runtime), and :meth:`close` disconnects what it connected. The actor reserves ``num_cpus`` CPUs
    (``split-server.num-cpus``; 0 by default because in simulation the client actor pool takes them
    all) and uses as many torch threads as the creating process so that its arithmetic matches the
    in-process placement bit for bit.

    With a CUDA ``device`` the actor reserves ``num_gpus`` Ray GPUs (``split-server.num-gpus``) and runs
    on the one Ray assigns it (Ray makes the assigned GPUs the actor's only visible ones, so an index in
    ``cuda:N`` is Ray's choice); with ``num_gpus=0`` it reserves none and keeps the device as named. The
    constructor waits until the actor is placed, and fails in one line if it cannot be within ``wait_seconds``.
    """

    detached = True
    """The actor steps its own ``θ_s`` (see :func:`sync_server_segment`)."""

    def __init__(
        self,
        model: SplitModel,
        wait_seconds: float = 120.0,
        num_gpus: float = 0.0,
        num_cpus: float = 0.0,
        ray_address: str = "",
        **optimizer_kwargs,
    ) -> None:
        import ray

        self._ray = ray
        self.owns_ray = connect_ray(ray_address) if ray_address else False  # then close() calls ray.shutdown
        deadline = time.monotonic() + wait_seconds
        while not ray.is_initialized():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "split-server.placement='ray' needs Flower's simulation engine or split-server.ray-address "
                    "(Ray was not initialised)"
                )
            time.sleep(0.05)
        optimizer_kwargs.setdefault("num_threads", torch.get_num_threads())  # as the ServerApp's (torch-threads)
        self._template = model
        self._kwargs = {
            **optimizer_kwargs,
            "wait_seconds": wait_seconds,
            "num_gpus": num_gpus,
            "num_cpus": num_cpus,
            "ray_address": ray_address,  # the copies join the same cluster (already connected: they own nothing)
        }
        gpus = float(num_gpus) if torch.device(optimizer_kwargs.get("device", "cpu")).type == "cuda" else 0.0
        actor_kwargs = {**optimizer_kwargs, "device": "cuda"} if gpus > 0 else optimizer_kwargs
        actor_class = ray.remote(num_cpus=float(num_cpus), num_gpus=gpus)(SplitServer)
        self._actor: Any = cast(Any, actor_class.remote(model, **actor_kwargs))  # a Ray actor handle
        self._pool: list[RaySplitServer] = []
        ready, _ = ray.wait([self._actor.ready.remote()], timeout=wait_seconds)
        if not ready:
            self._abandon()
            raise RuntimeError(
                f"the split server's Ray actor (num_cpus={float(num_cpus):g}, num_gpus={gpus:g}) was not placed within "
                f"{wait_seconds:g} s: the ClientApp actors may hold every CPU or GPU; lower split-server.num-cpus, "
                "split-server.num-gpus or the clients' share (--num-gpus-per-client)"
            )
        try:
            ray.get(ready[0])
        except Exception as error:  # noqa: BLE001 - Ray wraps whatever the constructor raised
            self._abandon()
            raise RuntimeError(f"the split server's Ray actor did not start: {_last_line(error)}") from None

    def _abandon(self) -> None:
        self._ray.kill(self._actor)
        if self.owns_ray:
            self._ray.shutdown()
            self.owns_ray = False

    @property
    def node_id(self) -> str:
        """The Ray node the actor runs on (its hex id)."""
        return self._ray.get(self._actor.__ray_call__.remote(lambda actor: _ray_node_id()))

    def step(self, batches, weights, apply: bool = True) -> StepResult:
        return self._ray.get(self._actor.step.remote(list(batches), list(weights), apply))

    def apply_pending(self) -> None:
        self._ray.get(self._actor.apply_pending.remote())

    def discard_pending(self) -> None:
        self._ray.get(self._actor.discard_pending.remote())

    def zo_differences(self, *args, **kwargs):
        return self._ray.get(self._actor.zo_differences.remote(*args, **kwargs))

    def zo_apply(self, *args, **kwargs) -> None:
        self._ray.get(self._actor.zo_apply.remote(*args, **kwargs))

    def zo_central_step(self, *args, **kwargs) -> tuple[list[float], float]:
        return self._ray.get(self._actor.zo_central_step.remote(*args, **kwargs))

    def losses(self, *args, **kwargs) -> tuple[list[float], float]:
        return self._ray.get(self._actor.losses.remote(*args, **kwargs))

    def server_weights(self) -> dict[str, torch.Tensor]:
        return self._ray.get(self._actor.server_weights.remote())

    def state(self) -> dict:
        return self._ray.get(self._actor.state.remote())

    def load_state(self, state: Mapping) -> None:
        self._ray.get(self._actor.load_state.remote(state))

    def copies(self, count: int) -> list[RaySplitServer]:
        """``count`` copies, each its own Ray actor, so SplitFed V1 steps them in parallel.

        The actors are pooled: a later call reuses them (loading the current state) instead of
        starting new worker processes every round.
        """
        state = self._ray.put(self.state())
        while len(self._pool) < count:
            self._pool.append(RaySplitServer(self._template, **self._kwargs))
        copies = self._pool[:count]
        self._ray.get([twin._actor.load_state.remote(state) for twin in copies])
        return copies

    def step_async(self, batches, weights):
        """Start :meth:`step` and return a Ray object reference."""
        return self._actor.step.remote(list(batches), list(weights))

    def close(self) -> None:
        """Stop the actor and its pooled copies; disconnect from the cluster if this server connected."""
        for twin in self._pool:
            twin.close()
        self._pool = []
        self._abandon()


def _last_line(error: BaseException) -> str:
    """The last line of an exception's message (Ray's are long), or its type's name."""
    lines = str(error).strip().splitlines()
    return lines[-1].strip() if lines else type(error).__name__


def _ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _bootstrap_address(address: str) -> str | None:
    """The ``host:port`` Ray itself will dial for ``address`` (it replaces a loopback host by the node's
    IP unless Ray is in its single-machine mode), or ``None`` when it cannot be told here."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address)
    except Exception:  # noqa: BLE001 - a private helper: without it, ray.init decides
        return None


def connect_ray(address: str, connect_timeout: float = 5.0) -> bool:
    """Connect this process to the Ray cluster at ``address`` (``split-server.ray-address``) unless Ray is
    initialised already; return whether it called ``ray.init``. A cluster that cannot be reached fails
    with one line naming the key and the address (the TCP check first, so a closed port fails in
    ``connect_timeout`` seconds rather than Ray's minutes of retries)."""
    import socket

    import ray

    if ray.is_initialized():
        return False
    key = f"split-server.ray-address={address!r}"
    target = None if address.startswith("ray://") else _bootstrap_address(address)
    if target:
        host, _, port = target.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=connect_timeout):
                pass
        except (OSError, ValueError) as error:
            via = "" if target == address else f" (Ray dials {target})"
            reason = (error.strerror if isinstance(error, OSError) else None) or str(error) or type(error).__name__
            raise RuntimeError(f"{key}: cannot reach the Ray cluster{via}: {reason}") from None
    try:
        ray.init(address=address, namespace="hosfl-flower", log_to_driver=False, configure_logging=False)
    except Exception as error:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
        raise RuntimeError(f"{key}: cannot connect to the Ray cluster: {_last_line(error)}") from None
    return True


def step_each(
    servers: Sequence[SplitServer | RaySplitServer],
    batches: Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor]],
) -> list[StepResult]:
    """Step server ``i`` on batch ``i`` (weight 1): in parallel when they are Ray actors."""
    if servers and all(isinstance(s, RaySplitServer) for s in servers):
        actors = cast(Sequence[RaySplitServer], servers)
        refs = [server.step_async([batch], [1.0]) for server, batch in zip(actors, batches)]
        return actors[0]._ray.get(refs)
    return [server.step([batch], [1.0]) for server, batch in zip(servers, batches)]


def build_split_server(
    model: SplitModel,
    placement: str,
    num_gpus: float = 0.0,
    num_cpus: float = 0.0,
    ray_address: str = "",
    **optimizer_kwargs,
) -> SplitServer | RaySplitServer:
    """A split server in this process (``local``) or as a Ray actor (``ray``: reserving ``num_cpus`` CPUs and,
    for a CUDA device, ``num_gpus`` GPUs, on the cluster at ``ray_address`` or else the simulation engine's Ray)."""
    if placement == "local":
        return SplitServer(model, **optimizer_kwargs)
    if placement == "ray":
        return RaySplitServer(model, num_gpus=num_gpus, num_cpus=num_cpus, ray_address=ray_address, **optimizer_kwargs)
    raise ValueError(f"unknown split-server placement {placement!r}; allowed: local, ray")
