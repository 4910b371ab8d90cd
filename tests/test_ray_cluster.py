"""The split server on an existing Ray cluster (``split-server.ray-address``), without Flower: a Ray head on
127.0.0.1 started by the deployment runner's helpers (stopped by PID), SplitFed V1's copies as actors on it,
bit-identical to local copies, and a one-line error for an address nothing listens on. Each Ray driver runs
in a subprocess, so the pytest worker never holds a Ray connection."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from .conftest import ROOT, subprocess_env
from .test_deployment_unit import _load_runner

runner = _load_runner()

DRIVER = r"""
import json, sys
import torch
import ray
from hosfl_flower.models import build_split_model
from hosfl_flower.split_server import RaySplitServer, SplitServer, step_each

torch.set_num_threads(1)
address = sys.argv[1]
model = build_split_model("cnn", 3, 10, seed=1)
settings = dict(optimizer="adamw", lr=0.02, num_threads=1)
remote = RaySplitServer(model, num_cpus=1, ray_address=address, **settings)
local = SplitServer(model, **settings, detach=True)
generator = torch.Generator().manual_seed(5)
with torch.no_grad():
    warm = [(model.smash({"x": torch.randn(6, 1, 8, 8, generator=generator)}), torch.randint(0, 10, (6,), generator=generator))]
for server in (remote, local):  # one step first, so the copies start from a state with optimizer moments
    server.step(warm, [1.0])
batches = []
with torch.no_grad():
    for _ in range(2):
        x = torch.randn(6, 1, 8, 8, generator=generator)
        batches.append((model.smash({"x": x}), torch.randint(0, 10, (6,), generator=generator)))
copies, twins = remote.copies(2), local.copies(2)
remote_steps, local_steps = step_each(copies, batches), step_each(twins, batches)
same = all(
    a.loss == b.loss and all(torch.equal(g, h) for g, h in zip(a.activation_grads, b.activation_grads))
    for a, b in zip(remote_steps, local_steps)
)
weights = all(
    all(torch.equal(v, twin.server_weights()[k]) for k, v in copy.server_weights().items())
    for copy, twin in zip(copies, twins)
)
nodes = {copy.node_id for copy in [remote, *copies]}
cluster = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
print("RESULT " + json.dumps({
    "gcs": ray.get_runtime_context().gcs_address, "owns_ray": remote.owns_ray,
    "copies_own_ray": [copy.owns_ray for copy in copies], "actors": len({id(c._actor) for c in [remote, *copies]}),
    "nodes": sorted(nodes), "cluster": cluster, "same_steps": same, "same_weights": weights,
}))
remote.close()
print("CONNECTED AFTER CLOSE", ray.is_initialized())
"""


def _driver(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", DRIVER, *args],
        cwd=ROOT,
        env=subprocess_env(**runner.RAY_LOOPBACK_ENV),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Any:
    work = tmp_path_factory.mktemp("ray")
    group = runner.ProcessGroup(work, subprocess_env(**runner.RAY_LOOPBACK_ENV), cwd=work)
    ray_head = runner.start_ray_head(group.start, work, num_cpus=3)
    try:
        runner.wait_for_ray_head(ray_head)
        group.check_running()
        yield ray_head, group
    finally:
        leftover = group.stop(ray_heads=[ray_head])
        if ray_head.own_temp_dir:
            import shutil

            shutil.rmtree(ray_head.temp_dir, ignore_errors=True)
        assert leftover == [], leftover
        assert runner.ray_processes(str(ray_head.temp_dir), ray_head.address, group.since) == {}


def test_splitfed_copies_are_actors_on_the_cluster_and_step_like_local_copies(head):
    ray_head, group = head
    assert "--node-ip-address=127.0.0.1" in ray_head.log.read_text().splitlines()[0]
    done = _driver(ray_head.address)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["gcs"] == ray_head.address
    assert result["owns_ray"] and result["copies_own_ray"] == [False, False]
    assert result["actors"] == 3 and result["nodes"] == result["cluster"] and len(result["cluster"]) == 1
    assert result["same_steps"] and result["same_weights"], result
    assert "CONNECTED AFTER CLOSE False" in done.stdout
    group.remember_descendants()  # the head's processes (workers too) are the runner's and carry its marker
    found = runner.ray_processes(str(ray_head.temp_dir), ray_head.address, group.since)
    assert found and set(found) <= set(group.alive()), (found, group.alive())


def test_an_unreachable_cluster_fails_in_one_line_naming_the_key():
    port = runner.free_port()  # nothing listens there
    code = (
        "import sys\nfrom hosfl_flower.split_server import connect_ray\n"
        "try:\n    connect_ray(sys.argv[1], connect_timeout=2.0)\n"
        "except RuntimeError as error:\n    print('ERROR', error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=subprocess_env(**runner.RAY_LOOPBACK_ENV),
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 1 and "\n" not in lines[0], done.stdout + done.stderr
    assert lines[0].startswith(f"ERROR split-server.ray-address='127.0.0.1:{port}': cannot reach the Ray cluster")


def test_the_ray_address_is_checked_with_the_run_config():
    from hosfl_flower.config import resolve_run_config
    from hosfl_flower.options import ConfigError

    resolved = resolve_run_config({"split-server.placement": "ray", "split-server.ray-address": "127.0.0.1:6379"})
    assert resolved["split-server.num-cpus"] == 0.0
    with pytest.raises(ConfigError, match="needs split-server.placement='ray'"):
        resolve_run_config({"split-server.ray-address": "127.0.0.1:6379"})
    with pytest.raises(ConfigError, match="host:port"):
        resolve_run_config({"split-server.placement": "ray", "split-server.ray-address": "127.0.0.1"})
    with pytest.raises(ConfigError, match="split-server.num-cpus"):
        resolve_run_config({"split-server.num-cpus": -1})


def test_a_long_work_dir_gets_a_short_ray_temp_dir(tmp_path):
    long_dir, own = runner.ray_temp_dir(tmp_path / ("x" * 80))
    try:
        assert own and len(str(long_dir)) + runner.RAY_SOCKET_SUFFIX <= runner.UNIX_SOCKET_LIMIT
    finally:
        long_dir.rmdir()
