"""Devices (docs/protocols.md, "Devices"): the device and precision keys, the split server on its own
device copy, nodes computing on a device copy of the canonical CPU θ_c, checkpoints of a device server,
and the GPU benchmark's quick CPU mode. Everything runs on the CPU: the device paths are forced there
(``SplitServer(detach=True)``, ``HOSFLClient.always_copy``)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import flwr.simulation
import pytest
import torch

from hosfl_flower import cli, reference
from hosfl_flower.checkpoint import read_checkpoint, save_checkpoint
from hosfl_flower.config import ConfigError, resolve_run_config
from hosfl_flower.data import sample_batch
from hosfl_flower.flower.strategy import HOSFLStrategy
from hosfl_flower.node.client import ClientSettings, HOSFLClient
from hosfl_flower.node.store import WeightStore
from hosfl_flower.protocols.hosfl.client import probe, smash
from hosfl_flower.protocols.hosfl.messages import ProbeRequest, SmashRequest
from hosfl_flower.protocols.messages import CatchUp
from hosfl_flower.reference import run_reference
from hosfl_flower.split_server import SplitServer, make_server_optimizer, sync_server_segment
from hosfl_flower.task import client_task, server_model_and_test
from hosfl_flower.zo import fingerprint

from .conftest import ROOT


class CopyingClient(HOSFLClient):
    """A node that computes on its device copy although its device is the CPU."""

    always_copy = True


def fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


SHORT = {"num-server-rounds": 4, "clients-per-round": 2, "zo.num-perturbations": 4, "eval-every": 2}


# ------------------------------------------------------------------ keys
@pytest.mark.parametrize(
    "key,value,gpus,message",
    [
        ("split-server.device", "cuda", 0, "split-server.device='cuda': CUDA is not available on this machine"),
        ("client.device", "cuda:0", 0, "client.device='cuda:0': CUDA is not available on this machine"),
        ("split-server.device", "cuda:3", 1, "split-server.device='cuda:3': this machine has 1 CUDA device (cuda:0)"),
        ("client.device", "cuda:2", 2, "this machine has 2 CUDA devices (cuda:0..cuda:1)"),
        ("split-server.device", "gpu", 1, "split-server.device='gpu': must be cpu, cuda, cuda:N or auto"),
        ("client.device", "cuda:", 1, "must be cpu, cuda, cuda:N or auto"),
        ("client.device", "CUDA", 1, "must be cpu, cuda, cuda:N or auto"),
        ("split-server.device", "cuda:-1", 1, "must be cpu, cuda, cuda:N or auto"),
        ("client.device", 0, 0, "client.device=0: must be a string"),
        ("split-server.precision", "fp16", 0, "fp16 autocast needs a CUDA split-server.device (on the CPU, use bf16)"),
        ("split-server.precision", "fp64", 0, "must be one of fp32, bf16, fp16"),
        ("split-server.num-gpus", -0.5, 0, "must be a number >= 0"),
    ],
)
def test_bad_device_settings_stop_in_one_line_naming_the_key(monkeypatch, key, value, gpus, message):
    fake_cuda(monkeypatch, gpus)
    with pytest.raises(ConfigError) as error:
        resolve_run_config({key: value})
    assert error.value.key == key
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_auto_and_cuda_indices_resolve_against_the_machine(monkeypatch):
    fake_cuda(monkeypatch, 0)
    assert resolve_run_config({"client.device": "auto", "split-server.device": "auto"})["client.device"] == "cpu"
    fake_cuda(monkeypatch, 2)
    config = resolve_run_config({"client.device": "auto", "split-server.device": "cuda:1"})
    assert (config["client.device"], config["split-server.device"]) == ("cuda", "cuda:1")
    assert resolve_run_config({})["split-server.device"] == "cpu"  # the default never asks for CUDA


def test_flower_simulation_gpu_share_and_device_errors(monkeypatch, capsys):
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    fake_cuda(monkeypatch, 0)
    assert cli.main(["--app", "hosfl_flower.app", "--num-gpus-per-client", "0.5"]) == 2
    assert (
        capsys.readouterr().err.strip() == "flower-simulation: --num-gpus-per-client 0.5: CUDA is not available on this machine"
    )
    assert cli.main(["--app", "hosfl_flower.app", "--run-config", "split-server.device='cuda'"]) == 2
    line = "flower-simulation: invalid run-config value split-server.device='cuda': CUDA is not available on this machine"
    assert capsys.readouterr().err.strip() == line
    fake_cuda(monkeypatch, 1)
    seen = {}
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["--app", "hosfl_flower.app", "--num-supernodes", "2", "--num-gpus-per-client", "0.25"]) == 0
    assert seen["backend_config"]["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}


# ------------------------------------------------------------------ the split server
def _smashed_batches(cfg, count: int = 2):
    task = client_task(cfg, 1)
    batches = []
    for index in range(count):
        batch = sample_batch(task.data.partition(0), cfg["batch-size"], cfg["seed"], 0, index)
        with torch.no_grad():
            batches.append((task.model.smash(batch.inputs), batch.labels))
    return batches


def _previous_step(model, optimizer, batches, weights):
    """The split server's step before devices existed (the arithmetic the default path must keep)."""
    optimizer.zero_grad(set_to_none=True)
    leaves, total = [], torch.zeros((), dtype=torch.float32)
    for (smashed, labels), weight in zip(batches, weights):
        z = smashed["z"].detach().clone().requires_grad_(True)
        leaves.append(z)
        total = total + weight * model.loss(model.head({**smashed, "z": z}), labels)
    total.backward()
    optimizer.step()
    return float(total.detach()), [z.grad for z in leaves]


def _equal_states(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.device.type == "cpu" and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    return a == b


def test_split_server_on_cpu_fp32_keeps_the_previous_arithmetic_shared_or_on_its_own_copy():
    cfg = resolve_run_config({"server.optimizer": "adamw"})
    batches, weights = _smashed_batches(cfg), [0.4, 0.6]
    before, _ = server_model_and_test(cfg)
    previous_model = server_model_and_test(cfg)[0]
    previous = make_server_optimizer("adamw", previous_model.server_parameters(), cfg["server.lr"])
    shared = SplitServer(server_model_and_test(cfg)[0], "adamw", cfg["server.lr"], device="cpu", precision="fp32")
    source = server_model_and_test(cfg)[0]
    detached = SplitServer(source, "adamw", cfg["server.lr"], device="cpu", precision="fp32", detach=True)
    assert not shared.detached and detached.detached and detached.model.client is source.client
    for _ in range(3):
        loss, grads = _previous_step(previous_model, previous, batches, weights)
        for server in (shared, detached):
            result = server.step(batches, weights)
            assert result.loss == loss
            assert all(torch.equal(g, h) and g.dtype == torch.float32 for g, h in zip(result.activation_grads, grads))
    held = [server.step(batches, weights, apply=False) for server in (shared, detached)]
    assert all(torch.equal(g, h) for g, h in zip(held[0].activation_grads, held[1].activation_grads))
    for server in (shared, detached):
        server.apply_pending()
        server.step(batches, weights, apply=False)
        server.discard_pending()
    first = len(source.client_parameters())
    perturbed = [[b[0]["z"] * 1.01, b[0]["z"] * 0.99] for b in batches]
    zo = [server.zo_differences(batches, perturbed, [5, 6], 1e-3, first) for server in (shared, detached)]
    assert zo[0][:2] == zo[1][:2]
    for server in (shared, detached):
        server.zo_apply([5, 6], [0.1, -0.2], 0.05, 1e-3, first)
    assert _equal_states(shared.state(), detached.state())
    assert _equal_states(dict(source.server.state_dict()), dict(before.server.state_dict()))  # untouched until synced
    sync_server_segment(detached, source)
    assert _equal_states(dict(source.server.state_dict()), shared.server_weights())


def test_a_reference_run_with_the_server_on_its_own_copy_equals_the_default(monkeypatch):
    config = {**SHORT, "strategy": "splitfed-v1"}
    default = run_reference(config, 4)
    monkeypatch.setattr(reference, "SplitServer", functools.partial(SplitServer, detach=True))
    detached = run_reference(config, 4)
    assert _equal_states(dict(default.model.state_dict()), dict(detached.model.state_dict()))
    assert default.history == detached.history


def test_bf16_autocast_on_the_cpu_trains_a_close_but_different_model():
    fp32 = run_reference(SHORT, 4)
    bf16 = run_reference({**SHORT, "split-server.precision": "bf16"}, 4)
    losses = [row["train-loss"] for row in bf16.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(abs(a - b) <= 0.05 * b for a, b in zip(losses, [row["train-loss"] for row in fp32.history]))
    a, b = fp32.model.state_dict(), bf16.model.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert abs(fp32.history[-1]["accuracy"] - bf16.history[-1]["accuracy"]) <= 0.1
    replica = fingerprint(bf16.model.client_parameters())  # every node still ends at the server's replica
    assert all(client.version is not None and client.version[1] == replica for client in bf16.clients.values())


# ------------------------------------------------------------------ nodes on a device copy
@pytest.mark.parametrize(
    "extra",
    [
        {"strategy": "hosfl"},
        {"strategy": "hosfl", "zo.estimator": "jvp", "zo.directions": "rademacher"},
        {"strategy": "zo-sfl"},
        {"strategy": "splitfed-v2"},
        {"strategy": "heron-sfl"},
        {"strategy": "fedavg", "fedavg.local-steps": 2},
        {"strategy": "splitfed-v1"},
        {"strategy": "cse-fsl", "cse-fsl.local-steps": 2},
        {"strategy": "fsl-sage", "fsl-sage.local-steps": 2, "fsl-sage.align-every": 2},
        {"strategy": "mu-splitfed", "mu-splitfed.local-steps": 2},
    ],
    ids=lambda extra: "-".join(str(v) for v in extra.values()),
)
def test_nodes_on_a_device_copy_keep_every_replica_and_metric_bit_identical(extra):
    config = {**SHORT, **extra}
    default = run_reference(config, 4)
    copying = run_reference(config, 4, client_class=CopyingClient)
    assert _equal_states(dict(default.model.state_dict()), dict(copying.model.state_dict()))
    assert default.history == copying.history
    for pid, client in copying.clients.items():
        assert client.version == default.clients[pid].version


def test_probe_scalars_and_theta_c_on_a_device_copy_equal_the_default_path():
    cfg = resolve_run_config({"zo.num-perturbations": 6})
    task = client_task(cfg, 2)
    settings = ClientSettings.from_config(cfg, 0, 2)
    seeds, lam = tuple(range(11, 17)), None
    results = []
    for kind in (HOSFLClient, CopyingClient):
        client = kind(task.model, task.data.partition(0), settings, task.initial_client_state, store=WeightStore(None))
        reply = smash(client, SmashRequest(CatchUp(0, [])), 1)
        if lam is None:
            lam = torch.randn(reply.batch.smashed["z"].shape, generator=torch.Generator().manual_seed(0))
        copied = client.device_copy().bytes_to_device if client.on_copy else 0
        scalars = probe(client, ProbeRequest(lam, seeds, cfg["zo.mu"], "forward", "gaussian"), 1).scalars
        copied = client.device_copy().bytes_to_device - copied if client.on_copy else 0
        results.append((reply.batch.smashed["z"], scalars, fingerprint(task.model.client_parameters()), copied))
    (z0, v0, fp0, _), (z1, v1, fp1, copied) = results
    assert torch.equal(z0, z1) and z1.device.type == "cpu" and z1.dtype == torch.float32
    assert v0 == v1 and fp0 == fp1
    theta = sum(p.numel() * p.element_size() for p in task.model.client_parameters())
    assert copied >= len(seeds) * theta  # a host-to-device copy of θ_c per probe forward, counted
    work = CopyingClient(task.model, task.data.partition(0), settings, task.initial_client_state).device_copy()
    assert work.model.server is task.model.server and work.model.client is not task.model.client


# ------------------------------------------------------------------ checkpoints
def test_a_checkpoint_of_a_server_on_its_own_copy_holds_cpu_tensors_and_round_trips(tmp_path):
    cfg = resolve_run_config({"server.optimizer": "adamw", "checkpoint-dir": str(tmp_path)})
    batches = _smashed_batches(cfg)

    def strategy():
        model, test = server_model_and_test(cfg)
        server = SplitServer(model, "adamw", cfg["server.lr"], device="cpu", detach=True)
        return HOSFLStrategy(model, test, cfg, split_server=server)

    saved = strategy()
    for _ in range(2):
        saved.split_server.step(batches, [0.5, 0.5])
    save_checkpoint(tmp_path, 2, cfg, saved.checkpoint_state())
    state = read_checkpoint(tmp_path)["state"]
    tensors = [t for t in state["server"]["optimizer"]["state"][0].values()] + list(state["server"]["weights"].values())
    assert all(t.device.type == "cpu" for t in tensors)
    resumed = strategy()
    resumed.check_checkpoint_state(state)
    resumed.load_checkpoint_state(state)
    assert _equal_states(saved.split_server.state(), resumed.split_server.state())
    assert _equal_states(dict(resumed.model.server.state_dict()), saved.split_server.server_weights())  # synced
    after = [s.split_server.step(batches, [0.5, 0.5]) for s in (saved, resumed)]
    assert after[0].loss == after[1].loss


# ------------------------------------------------------------------ the GPU benchmark
def test_gpu_benchmark_runs_quick_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    process = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and set(results["client"]) == {"finetune", "decoder"}
    for case in results["client"].values():
        assert set(case["memory"]) == {"inference", "hosfl", "splitfed-v2", "zo-sfl"}
        assert case["step_s"] > 0 and case["step_bytes_to_device"] >= (case["P"] + 1) * case["theta_bytes"]
    assert all(set(by) == {"fp32", "bf16"} for by in results["server_examples_per_s"].values())
    assert "probe step" in process.stdout
