"""The device paths on a real CUDA device (docs/protocols.md, "Devices"). Skipped where torch sees no
CUDA device; tests/test_devices.py forces the same paths on the CPU, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from hosfl_flower.reference import run_reference
from hosfl_flower.zo import fingerprint, perturb_, seed_direction, stream_values

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHORT = {"num-server-rounds": 4, "clients-per-round": 2, "zo.num-perturbations": 4, "eval-every": 2}
ON_CUDA = {"client.device": "cuda", "split-server.device": "cuda"}


def test_a_direction_on_cuda_parameters_is_the_cpu_stream():
    """Drawn on the CPU, moved to the device: the same values wherever the parameters live."""
    shapes = [(3, 5), (70_000,), (7,)]
    params = [torch.zeros(shape, device="cuda") for shape in shapes]
    expected = stream_values(11, 0, sum(math.prod(shape) for shape in shapes))
    direction = seed_direction(params, 11)
    assert all(d.device.type == "cuda" for d in direction)
    assert torch.equal(torch.cat([d.cpu().reshape(-1) for d in direction]), expected)
    perturb_(params, 11, 1.0)  # 0 + 1·u is u in any arithmetic
    assert torch.equal(torch.cat([p.cpu().reshape(-1) for p in params]), expected)


def _close_losses(a: list[dict], b: list[dict]) -> bool:
    pairs = [(x["train-loss"], y["train-loss"]) for x, y in zip(a, b) if "train-loss" in x and "train-loss" in y]
    return bool(pairs) and all(math.isfinite(y) and abs(x - y) <= 0.05 * abs(x) + 1e-3 for x, y in pairs)


@pytest.mark.parametrize("strategy", ["hosfl", "zo-sfl", "splitfed-v2", "heron-sfl", "cse-fsl", "mu-splitfed"])
def test_nodes_and_the_split_server_on_cuda_keep_the_canonical_cpu_replica(strategy):
    """θ_c stays float32 on the CPU; ledger protocols end with every node at the server's replica; the
    run tracks the CPU run (device kernels change last bits, not the course)."""
    cpu = run_reference({**SHORT, "strategy": strategy}, 4)
    gpu = run_reference({**SHORT, **ON_CUDA, "strategy": strategy}, 4)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in gpu.model.client_parameters())
    if strategy in ("hosfl", "zo-sfl"):
        replica = fingerprint(gpu.model.client_parameters())
        assert all(c.version is not None and c.version[1] == replica for c in gpu.clients.values())
    assert _close_losses(cpu.history, gpu.history)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_server_steps_on_cuda_track_fp32(precision):
    fp32 = run_reference({**SHORT, **ON_CUDA}, 4)
    mixed = run_reference({**SHORT, **ON_CUDA, "split-server.precision": precision}, 4)
    assert _close_losses(fp32.history, mixed.history)
    assert abs(fp32.history[-1]["accuracy"] - mixed.history[-1]["accuracy"]) <= 0.1
