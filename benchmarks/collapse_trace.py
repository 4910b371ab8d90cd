"""Per-round norms of an HO-SFL run on the reference loop: what happens in the rounds before a collapse.

For every round it prints the server loss, ``‖λ‖`` (all sampled clients), ``‖z‖``, the norm of the
backprop client gradient ``J_cᵀλ`` (computed here with autograd, for analysis only), ``‖v̄‖``, the norm
of the client update ``‖Δθ_c‖`` and ``‖θ_c‖``, plus the test accuracy every ``--eval-every`` rounds.

It runs :func:`hosfl_flower.reference.run_reference` unchanged, so the run is the reference loop's (and
a Flower run's) exactly, and observes it through its public arguments only:

- ``client_class``: :class:`TracingClient`, a node that records what the split server's step sends
  and receives: the ``z`` of its ``train.smash`` reply, the ``λ_n`` of its ``train.probe`` request
  and, before serving that probe, ``J_cᵀλ_n`` on its own inputs at the round's ``θ_c`` (the model its
  probe runs on; ``torch.autograd.grad``, so no parameter, gradient or buffer of the run changes);
- ``observe``: after each round, the server's loss (the round's ``train-loss``) and its updated ``θ_c``.

``J_cᵀλ`` is summed over the round's probed nodes, i.e. the gradient of the server's weighted loss.
A frozen client (``zo.num-perturbations=0``) is sent no ``λ``: its ``‖λ‖`` and ``‖J_cᵀλ‖`` print ``-``.

    python benchmarks/collapse_trace.py --run-config "cut-layer=2 zo.num-perturbations=5 client.lr=0.1 \\
        client.lr-schedule='constant' zo.clip-grad-norm=0.0 server.lr=0.003" --rounds 100
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hosfl_flower.node.client import HOSFLClient  # noqa: E402


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors))


@dataclass
class RoundNodes:
    """What the round's nodes saw: squared norms of ``z`` and ``λ``, and ``Σ_n J_cᵀλ_n`` per parameter."""

    z_squared: float = 0.0
    lambda_squared: float = 0.0
    probes: int = 0
    grad: list[Any] = field(default_factory=list)


class Trace:
    """The tracing nodes' records by round, and the client segment's initial weights."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundNodes] = defaultdict(RoundNodes)
        self.initial: list[Any] | None = None


def tracing_client(trace: Trace) -> type[HOSFLClient]:
    """A :class:`HOSFLClient` that records into ``trace`` and otherwise serves every request unchanged."""
    import torch

    from hosfl_flower.protocols.hosfl.messages import ProbeRequest, SmashReply

    class TracingClient(HOSFLClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.inputs: dict[int, dict[str, torch.Tensor]] = {}
            if trace.initial is None:
                trace.initial = [self.initial_client_state[name].detach().clone() for name in self.model.client_state()]

        def draw_batch(self, server_round: int, step: int | None = None):
            batch = super().draw_batch(server_round, step)
            self.inputs = {server_round: batch.inputs}  # the inputs of this round's train.smash
            return batch

        def handle(self, request: Any, server_round: int) -> Any:
            if isinstance(request, ProbeRequest):
                self.record_gradient(request.activation_grad, server_round)
            reply = super().handle(request, server_round)
            if isinstance(reply, SmashReply) and reply.batch is not None:
                trace.rounds[server_round].z_squared += float(reply.batch.smashed["z"].double().square().sum())
            return reply

        def record_gradient(self, lam: torch.Tensor, server_round: int) -> None:
            """``J_cᵀλ`` of this node's batch at the ``θ_c`` its probe runs on (the round's, before its update)."""
            self.restore()  # what the probe handler does first: the shared model holds this node's θ_c
            params = self.model.client_parameters()
            with torch.enable_grad():
                z = self.model.smash(dict(self.inputs[server_round]))["z"]
                grads = torch.autograd.grad(z, params, grad_outputs=lam, allow_unused=True)
            nodes = trace.rounds[server_round]
            grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
            nodes.grad = grads if not nodes.grad else [a + b for a, b in zip(nodes.grad, grads)]
            nodes.lambda_squared += float(lam.double().square().sum())
            nodes.probes += 1

    return TracingClient


def main() -> None:
    from hosfl_flower.config import parse_run_config_overrides
    from hosfl_flower.reference import RoundTrace, run_reference

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", default="", help="run-config overrides (key=value ...)")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--num-partitions", type=int, default=10)
    args = parser.parse_args()
    config = {
        **parse_run_config_overrides(args.run_config),
        "num-server-rounds": args.rounds,
        "eval-every": args.eval_every,
    }
    trace = Trace()
    rows: list[dict] = []
    weights: list[list] = []

    def observe(round_trace: RoundTrace) -> None:
        if not weights:
            assert trace.initial is not None
            weights.append(trace.initial)
        weights.append([p.detach().clone() for p in round_trace.model.client_parameters()])
        nodes = trace.rounds.pop(round_trace.round, RoundNodes())
        probed = nodes.probes > 0
        rows.append(
            {
                "loss": round_trace.metrics.get("train-loss", math.nan),
                "lambda": math.sqrt(nodes.lambda_squared) if probed else None,
                "z": math.sqrt(nodes.z_squared),
                "grad": _norm(nodes.grad) if probed else None,
            }
        )

    result = run_reference(config, args.num_partitions, observe, client_class=tracing_client(trace))
    scalars = {entry.round: math.sqrt(sum(v * v for v in entry.scalars)) for entry in result.ledger}
    print("round | server loss | ‖λ‖ | ‖z‖ | ‖J_cᵀλ‖ | ‖v̄‖ | ‖Δθ_c‖ | ‖θ_c‖ | test acc")
    for index, (row, history) in enumerate(zip(rows, result.history)):
        rnd = history["round"]
        update = _norm(a - b for a, b in zip(weights[index + 1], weights[index]))
        lam = f"{row['lambda']:.4f}" if row["lambda"] is not None else "-"
        grad = f"{row['grad']:8.3f}" if row["grad"] is not None else f"{'-':>8}"
        line = (
            f"{rnd:5d} | {row['loss']:11.4f} | {lam} | {row['z']:8.1f} | {grad} "
            f"| {scalars.get(rnd, 0.0):.5f} | {update:7.3f} | {_norm(weights[index + 1]):6.2f}"
        )
        if "accuracy" in history:
            line += f" | {history['accuracy']:.3f}"
        print(line)


if __name__ == "__main__":
    main()
