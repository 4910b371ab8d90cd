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
    step per uploaded batch, node by node in request order."""
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


# --------------------------------------------------------------------------- FSL-SAGE
def linear_head_grad(head, z, labels):
    """``∂ℓ/∂z`` of the mean cross-entropy of a linear head, by its closed form ``(softmax(Wz + b) − Y) W / B``
    (differentiable in ``W`` and ``b``, with no autograd through the loss)."""
    weight, bias = head.net.weight, head.net.bias
    flat = z.flatten(1)
    probabilities = torch.softmax(flat @ weight.T + bias, dim=1)
    onehot = torch.nn.functional.one_hot(labels, weight.shape[0]).to(z.dtype)
    return ((probabilities - onehot) @ weight / z.shape[0]).reshape(z.shape)


def fsl_sage_protocol(**settings):
    config = resolve_run_config({"strategy": "fsl-sage", "results-dir": "", "clients-per-round": 2, **settings})
    model, test = server_model_and_test(config)
    protocol = HOSFLStrategy(model, test, config).protocol
    clients = build_reference_nodes(config, 4)
    return config, protocol, clients, [NodeInfo(p, p, len(c.train)) for p, c in clients.items()]


def test_fsl_sage_client_steps_along_the_auxiliary_estimate_of_the_cut_gradient():
    """θ_c after h = 3 steps equals θ_c − lr J_cᵀ ĝ per step with ĝ the closed form of ∂ℓ(a(z), y)/∂z;
    θ_a is not trained by the node and not sent back; z of step k−1 = 2 is uploaded."""
    from hosfl_flower.protocols.fsl_sage.client import fsl_sage
    from hosfl_flower.protocols.fsl_sage.messages import FSLSageRequest

    model = build_split_model("cnn", 2, 10, seed=5)
    head = aux_head_for(model, seed=2)
    by_hand = copy.deepcopy(model)
    start = {k: v.clone() for k, v in model.client_state().items()}
    request = FSLSageRequest(start, {k: v.clone() for k, v in head.state_dict().items()}, 3, 3, 0.2)
    reply = fsl_sage(make_client(model), FSLSageRequest.from_record(request.to_record()), 2)

    params = by_hand.client_parameters()
    for step in range(3):
        batch = sample_batch(DATA.partition(0), BATCH, 0, 0, 2, step)
        z = by_hand.smash(batch.inputs)["z"]
        estimate = linear_head_grad(head, z.detach(), batch.labels).detach()
        if step == 2:
            uploaded = z.detach().clone()
        grads = torch.autograd.grad(z, params, grad_outputs=estimate)  # J_cᵀ ĝ
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.2 * g
    for name, value in by_hand.client_state().items():
        assert torch.allclose(reply.client_state[name], value, atol=1e-6, rtol=0), name
    assert any(not torch.equal(reply.client_state[k], v) for k, v in start.items())
    assert reply.steps == [2] and torch.allclose(reply.batches[0].smashed["z"], uploaded, atol=1e-6, rtol=0)
    assert reply.head_state == {} and "aux-head" not in reply.to_record()


def test_fsl_sage_aligns_the_auxiliary_model_every_l_rounds_and_only_then():
    """l = 2: θ_a changes in rounds 1, 3, 5 and in no other; θ_c changes every round; the nodes never send θ_a."""
    _, protocol, clients, nodes = fsl_sage_protocol(**{"fsl-sage.align-every": 2, "fsl-sage.align-epochs": 2})
    changed, rows = [], []
    for rnd in range(1, 7):
        head, client = protocol.head_state(), protocol.client_state()
        link = InProcessLink("fsl-sage", clients, rnd)
        rows.append(protocol.run_round(rnd, nodes[:2] if rnd % 2 else nodes[2:], link))
        changed.append(any(not torch.equal(head[k], v) for k, v in protocol.aux_head.state_dict().items()))
        assert any(not torch.equal(client[k], v) for k, v in protocol.model.client_state().items())
        assert link.account.round_trips == 1
    assert changed == [True, False, True, False, True, False]
    assert [("align-loss" in row) for row in rows] == changed


def test_fsl_sage_alignment_fits_the_server_cut_gradient_on_the_stored_uploads():
    """The alignment's targets are λ of the split server on each stored batch (θ_s unchanged by it); one
    epoch over one stored batch is one Adam step on Σ (ĝ − λ)² with ĝ in closed form; more epochs shrink
    the gap; the store keeps the latest buffer-size examples."""
    _, protocol, clients, nodes = fsl_sage_protocol(
        **{"fsl-sage.align-epochs": 1, "fsl-sage.buffer-size": 32, "fsl-sage.local-steps": 2, "fsl-sage.upload-every": 1}
    )
    protocol.settings = type(protocol.settings)(**{**protocol.settings.__dict__, "align_every": 1000})
    protocol.run_round(2, nodes[:2], InProcessLink("fsl-sage", clients, 2))  # (2 − 1) % 1000 ≠ 0: no alignment
    assert len(protocol.buffer) == 1 and protocol.buffer[0].num_examples == 32  # 4 uploads of 32, the newest kept
    server_before = protocol.split_server.state()["weights"]
    batch = protocol.buffer[0]
    result = protocol.split_server.step([(batch.smashed, batch.labels)], [1.0], apply=False)
    protocol.split_server.discard_pending()
    by_hand = copy.deepcopy(protocol.aux_head)
    optimizer = torch.optim.Adam(by_hand.parameters(), lr=protocol.settings.align_lr)
    ((linear_head_grad(by_hand, batch.smashed["z"], batch.labels) - result.activation_grads[0]) ** 2).sum().backward()
    optimizer.step()
    before = protocol.alignment_error()
    protocol.align()
    for name, value in by_hand.state_dict().items():
        assert torch.allclose(protocol.aux_head.state_dict()[name], value, atol=1e-6, rtol=1e-5), name
    assert all(torch.equal(v, protocol.split_server.state()["weights"][k]) for k, v in server_before.items())
    protocol.settings = type(protocol.settings)(**{**protocol.settings.__dict__, "align_epochs": 30})
    protocol.align()
    assert protocol.alignment_error() < 0.5 * before


# --------------------------------------------------------------------------- MU-SplitFed
class RecordingLink(InProcessLink):
    """An in-process link that keeps every request it carries and every reply it keeps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = []

    def call(self, node, request):
        reply = super().call(node, request)
        self.sent.append((node, request, reply))
        return reply


def test_mu_splitfed_takes_tau_server_steps_per_client_step_along_the_shared_direction():
    """E = 2, τ = 3, P = 2, two nodes: 3 zeroth-order steps of each node's replica per client step, each
    along 2 fresh directions; every node of a step perturbs along the same seeds v_p; a node's scalars are
    the central differences of its replica, after those τ steps (recomputed here by hand), on z±_p; its
    θ_c moves by −lr/P Σ g_p v_p; θ_c and θ_s become the examples-weighted averages (η_g = 1)."""
    from hosfl_flower.protocols.mu_splitfed.messages import MUSmashRequest, MUStepRequest
    from hosfl_flower.zo import perturb_

    config = resolve_run_config(
        {
            "strategy": "mu-splitfed",
            "results-dir": "",
            "mu-splitfed.local-steps": 2,
            "mu-splitfed.server-steps": 3,
            "mu-splitfed.client-lr": 0.05,
            "mu-splitfed.server-lr": 0.05,
            "mu-splitfed.num-perturbations": 2,
        }
    )
    model, test = server_model_and_test(config)
    protocol = HOSFLStrategy(model, test, config).protocol
    s = protocol.settings
    clients = build_reference_nodes(config, 4)
    nodes = [NodeInfo(p, p, len(c.train)) for p, c in clients.items()][:2]
    start_client = [p.detach().clone() for p in model.client_parameters()]
    start_server = copy.deepcopy(model.server)
    calls = []
    original_copies = protocol.split_server.copies

    def copies(count):
        replicas = original_copies(count)
        for index, replica in enumerate(replicas):
            step = replica.zo_central_step
            replica.zo_central_step = lambda *a, _i=index, _s=step: calls.append((_i, a[2])) or _s(*a)
        return replicas

    protocol.split_server.copies = copies
    link = RecordingLink("mu-splitfed", clients, 1)
    metrics = protocol.run_round(1, nodes, link)
    assert metrics["server-steps"] == 2 * 2 * 3 == len(calls) and metrics["finished"] == 2
    assert [i for i, _ in calls] == [0, 0, 0, 1, 1, 1] * 2
    assert len({seed for _, seed in calls}) == 12  # a fresh direction per server step
    smash = [(n, q, r) for n, q, r in link.sent if isinstance(q, MUSmashRequest)]
    steps = [(n, q, r) for n, q, r in link.sent if isinstance(q, MUStepRequest)]
    assert len(smash) == len(steps) == 4
    for e in range(2):
        assert len({q.seeds for _, q, _ in smash + steps if q.step == e}) == 1  # v_p, shared by the step's nodes

    replicas, finals = [], []
    for index, node in enumerate(nodes):
        server = copy.deepcopy(start_server)
        params = list(server.parameters())
        loss = lambda z, y: float(model.loss(server(z), y))  # noqa: E731
        for e in range(2):
            (_, _, reply), (_, request, _) = [x for x in smash if x[0] == node][e], [x for x in steps if x[0] == node][e]
            z, y = reply.batch.smashed["z"], reply.batch.labels
            for _, seeds in [c for c in calls if c[0] == index][3 * e : 3 * e + 3]:
                assert len(seeds) == 2
                with torch.no_grad():
                    estimates = []
                    for seed in seeds:
                        perturb_(params, seed, s.mu)
                        plus = loss(z, y)
                        perturb_(params, seed, -2 * s.mu)
                        minus = loss(z, y)
                        perturb_(params, seed, s.mu)
                        estimates.append((plus - minus) / (2 * s.mu))
                    for seed, g in zip(seeds, estimates):
                        perturb_(params, seed, -s.server_lr * g / 2)
            with torch.no_grad():
                by_hand = [(loss(a, y) - loss(b, y)) / (2 * s.mu) for a, b in zip(reply.plus, reply.minus)]
            assert list(request.scalars) == pytest.approx(by_hand, rel=1e-5, abs=1e-6)
        expected = [t.clone() for t in start_client]
        for _, request, _ in [x for x in steps if x[0] == node]:
            for seed, g in zip(request.seeds, request.scalars):
                perturb_(expected, seed, -request.lr * g / 2)
        final = [x for x in steps if x[0] == node][-1][2].weights
        got = [final[name] for name, _ in model.client.named_parameters()]
        assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(got, expected))
        replicas.append(server.state_dict())
        finals.append(final)
    shares = [n.num_examples / sum(n.num_examples for n in nodes) for n in nodes]
    for name, value in model.client_state().items():
        assert torch.allclose(value, shares[0] * finals[0][name] + shares[1] * finals[1][name], atol=1e-6), name
    for name, value in model.server.state_dict().items():
        assert torch.allclose(value, shares[0] * replicas[0][name] + shares[1] * replicas[1][name], atol=1e-5), name


# --------------------------------------------------------------------------- faults
FAULTS = {"faults.failure-rate": 0.3, "faults.nan-partition": 1, "faults.wrong-count-partition": 2}
KEPT = {"cse-fsl": "replies", "fsl-sage": "replies", "mu-splitfed": "finished"}


@pytest.mark.parametrize("strategy", list(KEPT))
def test_faulty_replies_never_reach_the_model(strategy):
    """Lost replies, NaN and wrong-count replies of two partitions: every one is left out, the segments
    stay finite, and a skipped round changes nothing."""
    from hosfl_flower.reference import run_reference

    config = {"strategy": strategy, "num-server-rounds": 6, "eval-every": 1, "clients-per-round": 4, "min-replies": 3}
    config.update({**FAULTS, "mu-splitfed.local-steps": 2, "cse-fsl.local-steps": 2, "fsl-sage.local-steps": 2})
    rows = []
    result = run_reference(config, 6, observe=lambda trace: rows.append(dict(trace.metrics)))
    assert all(bool(torch.isfinite(t).all()) for t in result.model.state_dict().values() if t.is_floating_point())
    assert sum(row[KEPT[strategy]] for row in rows) < sum(row["sampled"] for row in rows)
    assert any(row.get("skipped") for row in rows[1:]) and not all(row.get("skipped") for row in rows)
    for previous, row in zip(rows, rows[1:]):
        if row.get("skipped"):
            assert (row["loss"], row["accuracy"]) == (previous["loss"], previous["accuracy"])
