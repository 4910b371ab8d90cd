"""The papers' other baselines without Flower: each one's defining property against a hand computation
on the digits CNN (CSE-FSL's first-order local round, FSL-SAGE's gradient estimate and alignment,
MU-SplitFed's server steps per client step)."""

import copy

import pytest
import torch
from flwr.app import RecordDict

from hosfl_flower.config import resolve_run_config
from hosfl_flower.data import load_federated_data, sample_batch
from hosfl_flower.flower.strategy import HOSFLStrategy
from hosfl_flower.models import build_split_model
from hosfl_flower.models.aux_head import build_aux_head
from hosfl_flower.node.client import ClientSettings, HOSFLClient
from hosfl_flower.node.store import WeightStore
from hosfl_flower.protocols import NodeInfo
from hosfl_flower.protocols.cse_fsl.client import cse_fsl
from hosfl_flower.protocols.cse_fsl.messages import CSEFSLRequest
from hosfl_flower.protocols.registry import get_protocol
from hosfl_flower.reference import InProcessLink, build_reference_nodes
from hosfl_flower.task import server_model_and_test

DATA = load_federated_data("digits", 4, "iid", 0.3, 0, 0.2)
BATCH = 16


def make_client(model, partition=0):
    initial = {k: v.clone() for k, v in model.client_state().items()}
    settings = ClientSettings(seed=0, partition_id=partition, batch_size=BATCH)
    return HOSFLClient(model, DATA.partition(partition), settings, initial, RecordDict(), WeightStore(None), "unit", partition)


def aux_head_for(model, seed=0):
    z = model.smash(DATA.test.take(torch.arange(2)).inputs)["z"]
    return build_aux_head("linear", z, 10, seed)


# --------------------------------------------------------------------------- CSE-FSL
def test_cse_fsl_local_round_is_first_order_sgd_on_the_auxiliary_loss():
    """h = 5, k = 2: the client's θ_c and θ_a are five SGD steps on ℓ(h_a(f_c(x)), y), computed by hand,
    and the uploaded batches are z of steps 1 and 3 (k−1, 2k−1), taken before each step's update."""
    model = build_split_model("cnn", 2, 10, seed=3)
    head = aux_head_for(model, seed=1)
    by_hand, hand_head = copy.deepcopy(model), copy.deepcopy(head)
    lr, steps, every = 0.1, 5, 2
    start = {k: v.clone() for k, v in model.client_state().items()}
    request = CSEFSLRequest(start, head.state_dict(), steps, every, lr)
    reply = cse_fsl(make_client(model), CSEFSLRequest.from_record(request.to_record()), 4)

    uploads = {}
    params = [*by_hand.client_parameters(), *hand_head.parameters()]
    for step in range(steps):
        batch = sample_batch(DATA.partition(0), BATCH, 0, 0, 4, step)
        z = by_hand.smash(batch.inputs)["z"]
        if step % every == every - 1:
            uploads[step] = (z.detach().clone(), batch.labels)
        grads = torch.autograd.grad(by_hand.loss(hand_head(z), batch.labels), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g

    assert reply.steps == [1, 3] == sorted(uploads)
    for (step, (z, labels)), batch in zip(uploads.items(), reply.batches):
        assert torch.allclose(batch.smashed["z"], z, atol=1e-6, rtol=0) and torch.equal(batch.labels, labels), step
    for name, value in by_hand.client_state().items():
        assert torch.allclose(reply.client_state[name], value, atol=1e-6, rtol=0), name
    for name, value in hand_head.state_dict().items():
        assert torch.allclose(reply.head_state[name], value, atol=1e-6, rtol=0), name
    assert any(not torch.equal(reply.client_state[k], v) for k, v in start.items())  # it trained


def test_cse_fsl_sends_no_gradient_and_steps_the_server_once_per_upload():
    """One exchange per round, whose request carries no activation gradient; the server model takes one
    step per uploaded batch, in the order the replies arrive."""
    spec = get_protocol("cse-fsl")
    assert spec.requests == (CSEFSLRequest,)
    assert "activation_grads_down" not in CSEFSLRequest.categories.values()
    config = resolve_run_config(
        {"strategy": "cse-fsl", "results-dir": "", "cse-fsl.local-steps": 3, "cse-fsl.upload-every": 1, "clients-per-round": 2}
    )
    model, test = server_model_and_test(config)
    protocol = HOSFLStrategy(model, test, config).protocol
    clients = build_reference_nodes(config, 4)
    nodes = [NodeInfo(p, p, len(c.train)) for p, c in clients.items()]
    link = InProcessLink("cse-fsl", clients, 1)
    steps = []
    original = protocol.split_server.step
    protocol.split_server.step = lambda batches, weights: steps.append(batches[0][1].clone()) or original(batches, weights)
    metrics = protocol.run_round(1, nodes[:2], link)
    assert link.account.round_trips == 1 and metrics["server-steps"] == 6 == len(steps)
    expected = [sample_batch(clients[p].train, 32, config["seed"], p, 1, s).labels for p in (0, 1) for s in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(steps, expected))


@pytest.mark.parametrize("strategy", ["cse-fsl"])
def test_an_auxiliary_protocol_aggregates_weighted_by_the_server_known_examples(strategy):
    config = resolve_run_config({"strategy": strategy, "results-dir": ""})
    model, test = server_model_and_test(config)
    protocol = HOSFLStrategy(model, test, config).protocol
    base, head = model.client_state(), protocol.aux_head.state_dict()
    reply_type = get_protocol(strategy).requests[0].reply_type
    nodes = [NodeInfo(1, 0, 30), NodeInfo(2, 1, 10)]
    replies = {  # the second node claims 1000 examples: its weight stays the 10 the server learnt at discovery
        nodes[0]: reply_type(
            {k: torch.ones_like(v) for k, v in base.items()}, {k: torch.ones_like(v) for k, v in head.items()}, 30
        ),
        nodes[1]: reply_type(
            {k: torch.full_like(v, 5.0) for k, v in base.items()}, {k: torch.full_like(v, 5.0) for k, v in head.items()}, 1000
        ),
    }

    class Canned(InProcessLink):
        def exchange(self, requests, check=None):
            return {node: replies[node] for node, _ in requests}

    protocol.run_round(1, nodes, Canned(strategy, {}, 1))
    expected = (1.0 * 30 + 5.0 * 10) / 40
    assert all(torch.allclose(v, torch.full_like(v, expected)) for v in model.client_state().values())
    assert all(torch.allclose(v, torch.full_like(v, expected)) for v in protocol.aux_head.state_dict().values())
