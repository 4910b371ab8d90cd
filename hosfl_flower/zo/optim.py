"""Client optimizers for zeroth-order updates.

They step one parameter, or one piece of a parameter, at a time from a gradient built for it alone (one
block of the directions' stream: :func:`~hosfl_flower.zo.directions.gradient_blocks`), so an update never
materialises a full ``d_c``-sized gradient. The arithmetic is fixed here (not delegated to
``torch.optim``) because the server's replica and every client must produce the same bits, and the
state must travel as plain tensors (checkpoints, weight repair).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch


class ClientOptimizer(ABC):
    """Per-parameter optimizer whose state is a flat ``dict[str, Tensor]``."""

    name: str

    @abstractmethod
    def begin_step(self) -> None:
        """Called once before the parameters of one update are stepped."""

    @abstractmethod
    def step_param(
        self, index: int, param: torch.Tensor, grad: torch.Tensor, lr: float, piece: tuple[int, int] | None = None
    ) -> None:
        """Apply the update for parameter ``index`` in place; with ``piece = (start, stop)`` only to its
        flattened elements ``start:stop``, ``grad`` being theirs (flat)."""

    def step_params(
        self, indices: Sequence[int], params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: float
    ) -> None:
        """:meth:`step_param` for whole parameters, in order (an optimizer may batch them: same bits)."""
        for index, param, grad in zip(indices, params, grads):
            self.step_param(index, param, grad, lr)

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer state as named tensors (empty for stateless optimizers)."""

    @abstractmethod
    def load_state_tensors(self, state: dict[str, torch.Tensor], params: Sequence[torch.Tensor] | None = None) -> None:
        """Restore state produced by :meth:`state_tensors`; ``ValueError`` (nothing loaded) unless it is
        valid, and, given the ``params`` it steps, fits their number, shapes and dtypes."""


class SGD(ClientOptimizer):
    """Stateless SGD with optional decoupled weight decay: the client stays at inference-level memory."""

    name = "sgd"

    def __init__(self, weight_decay: float = 0.0) -> None:
        self.weight_decay = float(weight_decay)

    def begin_step(self) -> None:
        pass

    @torch.no_grad()
    def step_param(
        self, index: int, param: torch.Tensor, grad: torch.Tensor, lr: float, piece: tuple[int, int] | None = None
    ) -> None:
        target = param if piece is None else param.view(-1)[piece[0] : piece[1]]
        if self.weight_decay:
            target.mul_(1.0 - lr * self.weight_decay)
        target.add_(grad, alpha=-lr)

    @torch.no_grad()
    def step_params(
        self, indices: Sequence[int], params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: float
    ) -> None:
        params, grads = list(params), list(grads)
        if self.weight_decay:
            torch._foreach_mul_(params, 1.0 - lr * self.weight_decay)
        torch._foreach_add_(params, grads, alpha=-lr)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor], params: Sequence[torch.Tensor] | None = None) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"sgd state is a {type(state).__name__}, expected a dict")
        if state:
            raise ValueError(f"sgd is stateless but got state keys {sorted(state, key=str)[:3]}")


class AdamW(ClientOptimizer):
    """AdamW (decoupled weight decay, bias-corrected moments), as used by the paper's code."""

    name = "adamw"

    def __init__(
        self,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.step = 0
        self.exp_avg: dict[int, torch.Tensor] = {}
        self.exp_avg_sq: dict[int, torch.Tensor] = {}

    def begin_step(self) -> None:
        self.step += 1

    @torch.no_grad()
    def step_param(
        self, index: int, param: torch.Tensor, grad: torch.Tensor, lr: float, piece: tuple[int, int] | None = None
    ) -> None:
        if index not in self.exp_avg:
            self.exp_avg[index] = torch.zeros_like(param)
            self.exp_avg_sq[index] = torch.zeros_like(param)
        m, v = self.exp_avg[index], self.exp_avg_sq[index]
        if piece is not None:
            start, stop = piece
            param, m, v = param.view(-1)[start:stop], m.view(-1)[start:stop], v.view(-1)[start:stop]
        if self.weight_decay:
            param.mul_(1.0 - lr * self.weight_decay)
        m.mul_(self.beta1).add_(grad, alpha=1.0 - self.beta1)
        v.mul_(self.beta2).addcmul_(grad, grad, value=1.0 - self.beta2)
        bias1 = 1.0 - self.beta1**self.step
        bias2 = 1.0 - self.beta2**self.step
        denom = (v.sqrt() / math.sqrt(bias2)).add_(self.eps)
        param.addcdiv_(m, denom, value=-lr / bias1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {"step": torch.tensor(self.step, dtype=torch.int64)}
        for index in sorted(self.exp_avg):
            state[f"exp_avg.{index}"] = self.exp_avg[index]
            state[f"exp_avg_sq.{index}"] = self.exp_avg_sq[index]
        return state

    def load_state_tensors(self, state: dict[str, torch.Tensor], params: Sequence[torch.Tensor] | None = None) -> None:
        """Checks everything first: ``step`` an integer scalar tensor ``>= 0``; moments ``exp_avg.i`` and
        ``exp_avg_sq.i`` in pairs, finite floating tensors (second moments ``>= 0``), and with
        ``params`` one per parameter ``i`` of its shape and dtype."""
        if not isinstance(state, Mapping):
            raise TypeError(f"adamw state is a {type(state).__name__}, expected a dict")
        step = state.get("step", torch.tensor(0, dtype=torch.int64))
        if (
            not isinstance(step, torch.Tensor)
            or step.shape != ()
            or step.dtype not in (torch.int64, torch.int32)
            or int(step) < 0
        ):
            got = f"{tuple(step.shape)} {step.dtype} {step.tolist()}" if isinstance(step, torch.Tensor) else type(step).__name__
            raise ValueError(f"adamw step is {got}, expected an integer scalar tensor >= 0")
        moments: dict[str, dict[int, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
        for key, tensor in state.items():
            if key == "step":
                continue
            kind, _, index = key.rpartition(".") if isinstance(key, str) else ("", "", "")
            if kind not in moments or not index.isdigit():
                raise ValueError(f"unexpected adamw state key {key!r}")
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.layout != torch.strided:
                raise ValueError(f"adamw {key} is not a dense floating-point tensor")
            if params is not None:
                position = int(index)
                if position >= len(params):
                    raise ValueError(f"adamw {key}: there are {len(params)} parameters")
                param = params[position]
                if tensor.shape != param.shape or tensor.dtype != param.dtype:
                    raise ValueError(
                        f"adamw {key} is {tuple(tensor.shape)} {tensor.dtype}, "
                        f"parameter {position} is {tuple(param.shape)} {param.dtype}"
                    )
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"adamw {key} has entries that are not finite")
            if kind == "exp_avg_sq" and bool((tensor < 0).any()):
                raise ValueError(f"adamw {key} has negative entries")
            moments[kind][int(index)] = tensor
        unpaired = sorted(set(moments["exp_avg"]) ^ set(moments["exp_avg_sq"]))
        if unpaired:
            raise ValueError(f"adamw moments of parameter {unpaired[0]} come without their pair")
        self.step = int(step)
        self.exp_avg = {i: t.clone() for i, t in moments["exp_avg"].items()}
        self.exp_avg_sq = {i: t.clone() for i, t in moments["exp_avg_sq"].items()}


CLIENT_OPTIMIZERS = ("sgd", "adamw")


def make_client_optimizer(name: str, weight_decay: float = 0.0) -> ClientOptimizer:
    """Build a client optimizer by name (``sgd`` or ``adamw``)."""
    if name == "sgd":
        return SGD(weight_decay=weight_decay)
    if name == "adamw":
        return AdamW(weight_decay=weight_decay)
    raise ValueError(f"unknown client optimizer {name!r}; allowed: {', '.join(CLIENT_OPTIMIZERS)}")
