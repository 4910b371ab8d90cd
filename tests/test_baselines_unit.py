"""Baselines without Flower messages: SplitFed's split step, HERON-SFL's uploads and aggregation."""

import torch
from flwr.app import RecordDict

from hosfl_flower.client import ClientSettings, HOSFLClient
from hosfl_flower.config import resolve_run_config
from hosfl_flower.data import load_federated_data, sample_batch
from hosfl_flower.models import build_split_model
from hosfl_flower.models.aux_head import build_aux_head
from hosfl_flower.split_server import SplitServer, average_states
from hosfl_flower.strategies.aggregation import weighted_average
from hosfl_flower.strategies.heron import HeronReply, HeronSFLStrategy, upload_steps
from hosfl_flower.strategies.base import NodeInfo
from hosfl_flower.task import server_model_and_test

DATA = load_federated_data("digits", 4, "iid", 0.3, 0, 0.2)


def make_client(model, state=None, partition=0):
    initial = {k: v.clone() for k, v in model.client_state().items()}
    settings = ClientSettings(seed=0, partition_id=partition, batch_size=16)
    return HOSFLClient(model, DATA.partition(partition), settings, initial, state if state is not None else RecordDict())


def test_one_splitfed_step_equals_one_unsplit_backprop_step():
    split = build_split_model("cnn", 2, 10, seed=4)
    whole = build_split_model("cnn", 2, 10, seed=4)
    lr = 0.1
    client = make_client(split)
    result = client.splitfed_smash(1, 0, {k: v.clone() for k, v in split.client_state().items()})
    server = SplitServer(split, optimizer="sgd", lr=lr)
    step = server.step([(result.smashed, result.labels)], [1.0])
    client.splitfed_backward(1, 0, step.activation_grads[0], lr)

    batch = sample_batch(DATA.partition(0), 16, 0, 0, 1, 0)
    optimizer = torch.optim.SGD(whole.parameters(), lr=lr)
    whole.loss(whole(batch.inputs), batch.labels).backward()
    optimizer.step()
    for (name, a), b in zip(split.named_parameters(), whole.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    assert not torch.equal(split.client[0][0].weight, build_split_model("cnn", 2, 10, seed=4).client[0][0].weight)


def test_heron_keeps_a_batch_exactly_every_k_steps():
    assert upload_steps(6, 2) == [1, 3, 5] and upload_steps(7, 3) == [2, 5] and upload_steps(4, 4) == [3]
    model = build_split_model("cnn", 2, 10, seed=0)
    client = make_client(model)
    z = model.smash(DATA.test.take(torch.arange(2)).inputs)["z"]
    head = build_aux_head("linear", z, 10, 0)
    before = [p.clone() for p in model.client_parameters()]
    kept, _ = client.heron_train(1, model.client_state(), head, steps=6, upload_every=2, mu=1e-3, lr=0.01)
    assert [step for step, _, _ in kept] == [1, 3, 5]
    assert all(s["z"].shape[1:] == z.shape[1:] and len(y) == 16 for _, s, y in kept)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.client_parameters()))


def test_heron_aggregation_is_example_weighted():
    config = resolve_run_config({"strategy": "heron-sfl", "results-dir": ""})
    model, test = server_model_and_test(config)
    strategy = HeronSFLStrategy(model, test, config)
    base = model.client_state()
    head = strategy.aux_head.state_dict()
    ones = {k: torch.ones_like(v) for k, v in base.items()}
    fives = {k: torch.full_like(v, 5.0) for k, v in base.items()}
    replies = [
        HeronReply(NodeInfo(1, 0, 30), ones, {k: torch.ones_like(v) for k, v in head.items()}, [], 30, 0.0),
        HeronReply(NodeInfo(2, 1, 10), fives, {k: torch.full_like(v, 5.0) for k, v in head.items()}, [], 10, 0.0),
    ]
    metrics = strategy.aggregate_replies(1, replies)
    expected = (1.0 * 30 + 5.0 * 10) / 40
    assert all(torch.allclose(v, torch.full_like(v, expected)) for v in model.client_state().values())
    assert all(torch.allclose(v, torch.full_like(v, expected)) for v in strategy.aux_head.state_dict().values())
    assert metrics["replies"] == 2 and metrics["server-batches"] == 0


def test_weighted_average_and_server_state_average():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    assert torch.equal(weighted_average([a, b], [1, 1])["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(weighted_average([a, b], [3, 1])["w"], torch.tensor([1.5, 3.0]))
    server = SplitServer(build_split_model("cnn", 2, 10, seed=0), optimizer="adamw", lr=1e-3)
    state = server.state()
    assert all(torch.equal(x, y) for x, y in zip(average_states([state], [7.0])["weights"].values(), state["weights"].values()))
