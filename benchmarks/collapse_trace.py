"""Per-round norms of an HO-SFL run on the reference loop: what happens in the rounds before a collapse.

For every round it prints the server loss, ``‖λ‖`` (all sampled clients), ``‖z‖``, the norm of the
backprop client gradient ``J_cᵀλ`` (computed here with autograd, for analysis only), ``‖v̄‖``, the norm
of the client update ``‖Δθ_c‖`` and ``‖θ_c‖``, plus the test accuracy every ``--eval-every`` rounds.
It follows :func:`hosfl_flower.reference.run_reference` step by step (same schedule, batches, server
step, probes and update rule), so the accuracies are those of the reference loop.

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
    import torch

    from hosfl_flower.config import parse_run_config_overrides, resolve_run_config
    from hosfl_flower.data import load_federated_data, sample_batch
    from hosfl_flower.evaluation import evaluate_model
    from hosfl_flower.schedule import RoundSchedule
    from hosfl_flower.split_server import SplitServer
    from hosfl_flower.task import build_model, text_spec
    from hosfl_flower.zo import ClientUpdateRule, aggregate_scalars, apply_entry, make_client_optimizer, probe_scalars

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", default="", help="run-config overrides (key=value ...)")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--num-partitions", type=int, default=10)
    args = parser.parse_args()
    cfg = resolve_run_config({**parse_run_config_overrides(args.run_config), "num-server-rounds": args.rounds})
    torch.set_num_threads(cfg["torch-threads"])
    seed, num_probes, mu, n = cfg["seed"], cfg["zo.num-perturbations"], cfg["zo.mu"], args.num_partitions
    data = load_federated_data(
        cfg["dataset"], n, cfg["partitioner"], cfg["dirichlet-alpha"], seed, cfg["test-fraction"], text_spec(cfg)
    )
    model = build_model(cfg, data.info)
    server = SplitServer(model, cfg["server.optimizer"], cfg["server.lr"], cfg["server.momentum"], cfg["server.weight-decay"])
    optimizer = make_client_optimizer(cfg["client.optimizer"], cfg["client.weight-decay"])
    rule, schedule = ClientUpdateRule.from_config(cfg), RoundSchedule(seed)
    print("round | server loss | ‖λ‖ | ‖z‖ | ‖J_cᵀλ‖ | ‖v̄‖ | ‖Δθ_c‖ | ‖θ_c‖ | test acc")
    for rnd in range(1, args.rounds + 1):
        sampled, seeds = schedule.sample(range(n), cfg["clients-per-round"]), schedule.seeds(num_probes)
        canonical = {k: v.clone() for k, v in model.client_state().items()}
        batches, inputs = [], []
        with torch.no_grad():
            for pid in sampled:
                batch = sample_batch(data.partition(pid), cfg["batch-size"], seed, pid, rnd)
                batches.append((model.smash(batch.inputs), batch.labels))
                inputs.append(batch.inputs)
        sizes = [len(labels) for _, labels in batches]
        step = server.step(batches, [s / sum(sizes) for s in sizes])
        params = model.client_parameters()
        for param in params:
            param.grad = None
        surrogate = sum((model.smash(x)["z"] * lam).sum() for x, lam in zip(inputs, step.activation_grads))
        surrogate.backward()
        true_grad = _norm(p.grad for p in params)
        for param in params:
            param.grad = None
        update, vbar = 0.0, 0.0
        if num_probes:
            scalars = []
            for x, (smashed, _), lam in zip(inputs, batches, step.activation_grads):
                scalars.append(probe_scalars(
                    cfg["zo.estimator"], lambda x=x: model.smash(x)["z"], model.client, lam, seeds, mu,
                    anchor=smashed["z"], distribution=cfg["zo.directions"],
                ))
                model.load_client_state(canonical)
            entry = rule.entry(rnd, seeds, aggregate_scalars(scalars, sum(sizes), sum(sizes)), params)
            before = [p.detach().clone() for p in params]
            apply_entry(params, optimizer, entry)
            update, vbar = _norm(p - b for p, b in zip(params, before)), math.sqrt(sum(v * v for v in entry.scalars))
        line = (
            f"{rnd:5d} | {step.loss:11.4f} | {_norm(step.activation_grads):.4f} | {_norm(s['z'] for s, _ in batches):8.1f} "
            f"| {true_grad:8.3f} | {vbar:.5f} | {update:7.3f} | {_norm(params):6.2f}"
        )
        if rnd % args.eval_every == 0 or rnd == args.rounds:
            line += f" | {evaluate_model(model, data.test, cfg['eval-batch-size'])[1]:.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
