"""Per-round norms of an HO-SFL run on the reference loop: what happens in the rounds before a collapse.

For every round it prints the server loss, ``‖λ‖`` (all sampled clients), ``‖z‖``, the norm of the
backprop client gradient ``J_cᵀλ`` (computed here with autograd, for analysis only), ``‖v̄‖``, the norm
of the client update ``‖Δθ_c‖`` and ``‖θ_c‖``, plus the test accuracy every ``--eval-every`` rounds.
It observes :func:`hosfl_flower.reference.run_reference` through its ``observe`` hook, so the run
is the reference loop's (and a Flower run's) exactly.

    python benchmarks/collapse_trace.py --run-config "cut-layer=2 zo.num-perturbations=5 client.lr=0.1 \\
        client.lr-schedule='constant' zo.clip-grad-norm=0.0 server.lr=0.003" --rounds 100
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors))


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
    rows: list[dict] = []
    weights: list[list] = []

    def observe(trace: RoundTrace) -> None:
        params = trace.model.client_parameters()
        weights.append([p.detach().clone() for p in params])
        for param in params:
            param.grad = None
        surrogate = sum((trace.model.smash(x)["z"] * lam).sum() for x, lam in zip(trace.inputs, trace.step.activation_grads))
        surrogate.backward()  # the backprop client gradient J_cᵀλ, for comparison only
        rows.append(
            {
                "loss": trace.step.loss,
                "lambda": _norm(trace.step.activation_grads),
                "z": _norm(trace.smashed),
                "grad": _norm(p.grad for p in params),
            }
        )
        for param in params:
            param.grad = None

    result = run_reference(config, args.num_partitions, observe)
    weights.append([p.detach().clone() for p in result.model.client_parameters()])
    scalars = {entry.round: math.sqrt(sum(v * v for v in entry.scalars)) for entry in result.ledger}
    print("round | server loss | ‖λ‖ | ‖z‖ | ‖J_cᵀλ‖ | ‖v̄‖ | ‖Δθ_c‖ | ‖θ_c‖ | test acc")
    for index, (row, history) in enumerate(zip(rows, result.history)):
        rnd = history["round"]
        update = _norm(a - b for a, b in zip(weights[index + 1], weights[index]))
        line = (
            f"{rnd:5d} | {row['loss']:11.4f} | {row['lambda']:.4f} | {row['z']:8.1f} | {row['grad']:8.3f} "
            f"| {scalars.get(rnd, 0.0):.5f} | {update:7.3f} | {_norm(weights[index + 1]):6.2f}"
        )
        if "accuracy" in history:
            line += f" | {history['accuracy']:.3f}"
        print(line)


if __name__ == "__main__":
    main()
