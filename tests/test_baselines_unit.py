"""Baselines without Flower messages: SplitFed's split step, HERON-SFL's uploads and aggregation."""

import torch
from flwr.app import RecordDict

from hosfl_flower.config import resolve_run_config
from hosfl_flower.data import load_federated_data, sample_batch
from hosfl_flower.flower.strategy import HOSFLStrategy
from hosfl_flower.models import build_split_model
from hosfl_flower.models.aux_head import build_aux_head
from hosfl_flower.node.client import ClientSettings, HOSFLClient
from hosfl_flower.node.store import WeightStore
from hosfl_flower.protocols import Link, NodeInfo
from hosfl_flower.protocols.aggregation import weighted_average
from hosfl_flower.protocols.heron.client import local_training
from hosfl_flower.protocols.heron.messages import HeronReply, HeronRequest, upload_steps
from hosfl_flower.protocols.splitfed import client as splitfed
from hosfl_flower.protocols.splitfed.messages import SplitFedGradRequest, SplitFedSmashRequest
from hosfl_flower.split_server import SplitServer, average_states
from hosfl_flower.task import server_model_and_test

DATA = load_federated_data("digits", 4, "iid", 0.3, 0, 0.2)


def make_client(model, state=None, partition=0):
    initial = {k: v.clone() for k, v in model.client_state().items()}
    settings = ClientSettings(seed=0, partition_id=partition, batch_size=16)
    state = state if state is not None else RecordDict()
    return HOSFLClient(model, DATA.partition(partition), settings, initial, state, WeightStore(None), "unit", partition)


def test_one_splitfed_step_equals_one_unsplit_backprop_step():
    split = build_split_model("cnn", 2, 10, seed=4)
    whole = build_split_model("cnn", 2, 10, seed=4)
    lr = 0.1
    client = make_client(split)
    reply = splitfed.smash(client, SplitFedSmashRequest(0, {k: v.clone() for k, v in split.client_state().items()}), 1)
    server = SplitServer(split, optimizer="sgd", lr=lr)
    step = server.step([(reply.batch.smashed, reply.batch.labels)], [1.0])
    splitfed.backward(client, SplitFedGradRequest(step.activation_grads[0], 0, lr, True), 1)

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
    head = build_aux_head("linear", z, 10, 0).state_dict()
    before = [p.clone() for p in model.client_parameters()]
    request = HeronRequest(model.client_state(), head, local_steps=6, upload_every=2, mu=1e-3, lr=0.01)
    kept, _ = local_training(client, request, 1)
    assert sorted(kept) == [1, 3, 5]
    assert all(b.smashed["z"].shape[1:] == z.shape[1:] and b.num_examples == 16 for b in kept.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.client_parameters()))


class CannedLink(Link):
    """A link whose nodes' replies are given (no node runs)."""

    def __init__(self, replies):
        super().__init__("test")
        self.replies = replies

    def exchange(self, requests, check=None):
        return {node: self.replies[node] for node, _ in requests if node in self.replies}


def test_heron_aggregation_is_weighted_by_the_server_known_examples():
    config = resolve_run_config({"strategy": "heron-sfl", "results-dir": ""})
    model, test = server_model_and_test(config)
    protocol = HOSFLStrategy(model, test, config).protocol
    base, head = model.client_state(), protocol.aux_head.state_dict()
    nodes = [NodeInfo(1, 0, 30), NodeInfo(2, 1, 10)]
    replies = {
        # the second node claims 1000 examples: its weight stays the 10 the server learnt at discovery
        nodes[0]: HeronReply(
            {k: torch.ones_like(v) for k, v in base.items()}, {k: torch.ones_like(v) for k, v in head.items()}, 30
        ),
        nodes[1]: HeronReply(
            {k: torch.full_like(v, 5.0) for k, v in base.items()}, {k: torch.full_like(v, 5.0) for k, v in head.items()}, 1000
        ),
    }
    metrics = protocol.run_round(1, nodes, CannedLink(replies))
    expected = (1.0 * 30 + 5.0 * 10) / 40
    assert all(torch.allclose(v, torch.full_like(v, expected)) for v in model.client_state().values())
    assert all(torch.allclose(v, torch.full_like(v, expected)) for v in protocol.aux_head.state_dict().values())
    assert metrics["replies"] == 2 and metrics["server-batches"] == 0


class HalfWeights(HOSFLStrategy):
    def aggregation_weights(self, server_round, num_examples):
        return [0.5] * len(num_examples)


def test_a_strategy_hook_sets_the_weights_a_protocol_aggregates_with():
    config = resolve_run_config({"strategy": "splitfed-v2", "results-dir": ""})
    model, test = server_model_and_test(config)
    protocol = HalfWeights(model, test, config).protocol
    assert protocol.weights(1, [30, 10]) == [0.5, 0.5]


def test_weighted_average_and_server_state_average():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    assert torch.equal(weighted_average([a, b], [1, 1])["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(weighted_average([a, b], [3, 1])["w"], torch.tensor([1.5, 3.0]))
    server = SplitServer(build_split_model("cnn", 2, 10, seed=0), optimizer="adamw", lr=1e-3)
    state = server.state()
    assert all(torch.equal(x, y) for x, y in zip(average_states([state], [7.0])["weights"].values(), state["weights"].values()))
