"""HO-SFL as a plain in-process loop, with no Flower: the independent check of the Flower run.

It uses the same maths (models, split server, zeroth-order engine, schedule, minibatch draw) but none
of the message, record, state or strategy machinery, so a Flower run that ends ``torch.equal`` to this
loop has moved every number through Flower without loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import resolve_run_config
from .data import load_federated_data, sample_batch
from .evaluation import evaluate_model
from .models import SplitModel
from .schedule import RoundSchedule
from .split_server import SplitServer, StepResult
from .task import build_model, text_spec
from .zo import ClientUpdateRule, Ledger, aggregate_scalars, apply_entry, make_client_optimizer, probe_scalars


@dataclass
class ReferenceResult:
    """Final split model (client = the shared ``θ_c``), the ledger, and per-round metrics."""

    model: SplitModel
    ledger: Ledger
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RoundTrace:
    """What :func:`run_reference` shows an observer after a round's server step, before the client update."""

    round: int
    model: SplitModel
    inputs: list[dict[str, torch.Tensor]]
    smashed: list[torch.Tensor]
    step: StepResult


def run_reference(
    run_config: Mapping[str, Any],
    num_partitions: int,
    observe: Callable[[RoundTrace], None] | None = None,
) -> ReferenceResult:
    """Run HO-SFL for ``num-server-rounds`` rounds over ``num_partitions`` nodes, all in this process.

    ``observe`` (for analysis) is called each round after the server step, with the client segment
    still at the round's ``θ_c``; it must not change the model.
    """
    cfg = resolve_run_config(run_config)
    torch.set_num_threads(cfg["torch-threads"])
    seed, num_probes, mu = cfg["seed"], cfg["zo.num-perturbations"], cfg["zo.mu"]
    data = load_federated_data(
        cfg["dataset"], num_partitions, cfg["partitioner"], cfg["dirichlet-alpha"], seed, cfg["test-fraction"],
        text_spec(cfg),
    )
    model = build_model(cfg, data.info)
    server = SplitServer(
        model,
        optimizer=cfg["server.optimizer"],
        lr=cfg["server.lr"],
        momentum=cfg["server.momentum"],
        weight_decay=cfg["server.weight-decay"],
    )
    client_optimizer = make_client_optimizer(cfg["client.optimizer"], cfg["client.weight-decay"])
    update_rule = ClientUpdateRule.from_config(cfg)
    schedule = RoundSchedule(seed)
    ledger = Ledger()
    result = ReferenceResult(model, ledger)

    for rnd in range(1, cfg["num-server-rounds"] + 1):
        sampled = schedule.sample(range(num_partitions), cfg["clients-per-round"])
        seeds = schedule.seeds(num_probes)
        canonical = {k: v.clone() for k, v in model.client_state().items()}
        batches, inputs = [], []
        with torch.no_grad():
            for pid in sampled:
                batch = sample_batch(data.partition(pid), cfg["batch-size"], seed, pid, rnd)
                batches.append((model.smash(batch.inputs), batch.labels))
                inputs.append(batch.inputs)
        sizes = [len(labels) for _, labels in batches]
        step = server.step(batches, [n / sum(sizes) for n in sizes])
        if observe is not None:
            observe(RoundTrace(rnd, model, inputs, [smashed["z"] for smashed, _ in batches], step))
        row: dict[str, Any] = {"round": rnd, "train_loss": step.loss}
        if num_probes:
            scalars = []
            for batch_inputs, (smashed, _), lam in zip(inputs, batches, step.activation_grads):
                scalars.append(
                    probe_scalars(
                        cfg["zo.estimator"],
                        lambda batch_inputs=batch_inputs: model.smash(batch_inputs)["z"],
                        model.client,
                        lam,
                        seeds,
                        mu,
                        anchor=smashed["z"],
                        distribution=cfg["zo.directions"],
                    )
                )
                model.load_client_state(canonical)
            entry = update_rule.entry(rnd, seeds, aggregate_scalars(scalars, sum(sizes), sum(sizes)), model.client_parameters())
            ledger.append(entry)
            apply_entry(model.client_parameters(), client_optimizer, entry)
        if rnd % cfg["eval-every"] == 0 or rnd == cfg["num-server-rounds"]:
            row["loss"], row["accuracy"] = evaluate_model(model, data.test, cfg["eval-batch-size"])
        result.history.append(row)
    return result
