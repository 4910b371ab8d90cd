"""Split models, data partitioning and the deterministic minibatch draw."""

import pytest
import torch

from hosfl_flower.data import load_federated_data, sample_batch
from hosfl_flower.models import SplitCNN, build_split_model
from hosfl_flower.split_server import SplitServer


def test_split_forward_equals_unsplit_and_every_cut_is_valid():
    x = torch.rand(4, 1, 8, 8)
    reference = build_split_model("cnn", 1, 10, seed=3)
    full = torch.nn.Sequential(*reference.client, *reference.server)
    for cut in range(1, 5):
        model = build_split_model("cnn", cut, 10, seed=3)
        assert torch.equal(model({"x": x}), full(x))
        assert len(model.client) == cut
    for bad in (0, 5):
        with pytest.raises(ValueError, match=f"cut-layer {bad} is outside"):
            SplitCNN(cut_layer=bad)


def test_same_seed_same_initial_weights():
    a, b, c = (build_split_model("cnn", 2, 10, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_split_server_step_equals_end_to_end_backprop():
    """The server's λ and θ_s update are those of backprop through the unsplit model."""
    model = build_split_model("cnn", 2, 10, seed=0)
    twin = build_split_model("cnn", 2, 10, seed=0)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    with torch.no_grad():
        smashed = model.smash({"x": x})
    server = SplitServer(model, optimizer="sgd", lr=0.1)
    result = server.step([(smashed, y)], [1.0])

    z = twin.client(x).detach().requires_grad_(True)
    loss = twin.loss(twin.server(z), y)
    loss.backward()
    with torch.no_grad():
        for p in twin.server.parameters():
            p -= 0.1 * p.grad
    assert torch.allclose(result.activation_grads[0], z.grad, atol=1e-7)
    assert abs(result.loss - float(loss.detach())) < 1e-6
    for a, b in zip(model.server.parameters(), twin.server.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_iid_and_dirichlet_partitions_cover_the_training_split():
    iid = load_federated_data("digits", 10, "iid", 0.3, 0, 0.2)
    sizes = [len(iid.partition(i)) for i in range(10)]
    assert sum(sizes) == 1797 - len(iid.test) and max(sizes) - min(sizes) <= 1
    skewed = load_federated_data("digits", 10, "dirichlet", 0.3, 0, 0.2)
    skewed_sizes = [len(skewed.partition(i)) for i in range(10)]
    assert sum(skewed_sizes) == sum(sizes)
    assert max(skewed_sizes) > 1.5 * min(skewed_sizes)
    label_share = torch.bincount(skewed.partition(0).labels, minlength=10).float() / skewed_sizes[0]
    assert label_share.max() > 0.2, "alpha=0.3 should skew the label mix"
    with pytest.raises(ValueError, match="partition-id 10"):
        iid.partition(10)


def test_minibatch_draw_is_deterministic():
    data = load_federated_data("digits", 10, "iid", 0.3, 0, 0.2).partition(0)
    a, b, c = sample_batch(data, 32, 0, 0, 5), sample_batch(data, 32, 0, 0, 5), sample_batch(data, 32, 0, 0, 6)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.inputs["x"], b.inputs["x"])
    assert not torch.equal(a.inputs["x"], c.inputs["x"])
    assert len(sample_batch(data, 10_000, 0, 0, 1)) == len(data)
