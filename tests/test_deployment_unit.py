"""The deployment script without a deployment: private keys are never readable by others, stray
clean-up matches whole arguments only, the connection config and every process's flags (insecure, and
TLS with SuperNode authentication) are what Flower expects, and bad combinations fail before anything
starts."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import ROOT


def _load_runner() -> ModuleType:
    name = "deployment_runner"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "deployment" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


# --------------------------------------------------------------------------- L7: private keys
@pytest.fixture
def no_chmod(monkeypatch):
    """Umask 0 and every chmod a no-op: a file is only private if it was created private."""
    old = os.umask(0)
    for module, name in ((os, "chmod"), (os, "fchmod"), (Path, "chmod")):
        monkeypatch.setattr(module, name, lambda *args, **kwargs: None)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_keys_are_created_owner_only(tmp_path, no_chmod):
    certs = runner.make_certificates(tmp_path / "certificates")
    assert _mode(certs.key) == 0o600
    key = runner.make_node_key(tmp_path / "keys", "supernode-0")
    assert _mode(key.private) == 0o600
    assert runner.write_private(tmp_path / "keys" / "supernode-0", b"again") and _mode(key.private) == 0o600


def test_write_private_does_not_follow_a_planted_link(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / "key").symlink_to(target)
    runner.write_private(tmp_path / "key", b"secret")
    assert target.read_text() == "keep" and not (tmp_path / "key").is_symlink()
    assert (tmp_path / "key").read_bytes() == b"secret" and _mode(tmp_path / "key") == 0o600


def test_node_keys_are_in_the_formats_flower_loads(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    key = runner.make_node_key(tmp_path, "node")
    private = load_ssh_private_key(key.private.read_bytes(), None)  # what flower-supernode does
    assert try_load_public_key(key.public) == public_key_to_bytes(private.public_key())  # what flwr supernode register does


# --------------------------------------------------------------------------- L2: stray clean-up
def test_stray_clean_up_matches_whole_arguments_only(monkeypatch):
    """The work dir ``/tmp/hosfl`` must not match ``/tmp/hosfl-2``, port 9092 not 90921, and a process is
    a Flower process by its program, not by a word somewhere on its command line."""
    python, venv = "/venv/bin/python3.11", "/venv/bin/"
    processes = {
        100: [python, venv + "flwr-clientapp", "--runtime-api-address", "127.0.0.1:9092", "--token-stdin"],
        101: [python, venv + "flwr-clientapp", "--runtime-api-address", "127.0.0.1:90921", "--token-stdin"],
        102: [python, venv + "flower-superlink", "--database", "/tmp/hosfl-2/superlink-state.db"],
        103: [python, venv + "flower-superlink", "--database", "/tmp/hosfl/superlink-state.db"],
        104: ["/usr/bin/vim", "/tmp/hosfl/flwr-clientapp-notes.txt"],
        105: [venv + "flower-supernode", "--superlink=127.0.0.1:9092"],
        106: [python, venv + "flower-superexec", "--runtime-api-address", "127.0.0.1:19092"],
        107: [python, venv + "flwr-serverapp", "--run-dir", "/tmp/hosfl"],
    }
    monkeypatch.setattr(runner, "_all_pids", lambda: list(processes))
    monkeypatch.setattr(runner, "_started", lambda pid: 1000 if pid in processes else None)
    monkeypatch.setattr(runner, "cmdline", lambda pid: " ".join(processes.get(pid, [])))
    monkeypatch.setattr(runner, "argv", lambda pid: list(processes.get(pid, [])), raising=False)
    found = runner.flower_processes(["/tmp/hosfl", "127.0.0.1:9092"])
    assert sorted(found) == [100, 103, 105, 107]


def test_stray_clean_up_skips_processes_older_than_the_group(monkeypatch):
    processes = {200: ["/venv/bin/python", "/venv/bin/flwr-clientapp", "--runtime-api-address", "127.0.0.1:9092"]}
    monkeypatch.setattr(runner, "_all_pids", lambda: list(processes))
    monkeypatch.setattr(runner, "_started", lambda pid: 500)
    monkeypatch.setattr(runner, "argv", lambda pid: list(processes.get(pid, [])))
    assert list(runner.flower_processes(["127.0.0.1:9092"], since=400)) == [200]
    assert runner.flower_processes(["127.0.0.1:9092"], since=600) == {}


def test_argv_reads_arguments_exactly():
    args = [sys.executable, "-c", "import time; time.sleep(60)", "a b", "", "--x=127.0.0.1:1"]
    process = subprocess.Popen(args)
    try:
        deadline = time.monotonic() + 10
        while runner.argv(process.pid) != args and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.argv(process.pid) == args
        assert runner.names_one_of(runner.argv(process.pid), ["127.0.0.1:1"])
        assert not runner.names_one_of(runner.argv(process.pid), ["a", "127.0.0.1:10"])
    finally:
        process.kill()
        process.wait()
    assert runner.argv(process.pid) == []


# --------------------------------------------------------------------------- connection config and flags
def test_connection_config_insecure_and_tls(tmp_path):
    import tomllib

    insecure = tomllib.loads(runner.write_connection(tmp_path / "a", 9092, None).read_text())
    assert insecure["superlink"]["default"] == "deployment"
    assert insecure["superlink"]["deployment"] == {"address": "127.0.0.1:9092", "insecure": True}
    ca = tmp_path / "ca.pem"
    tls = tomllib.loads(runner.write_connection(tmp_path / "b", 9093, ca).read_text())
    assert tls["superlink"]["deployment"] == {"address": "127.0.0.1:9093", "root-certificates": str(ca.resolve())}


class _Stop(Exception):
    pass


class _FakeProcess:
    returncode = 0
    pid = 0

    def poll(self):
        return 0


def _dry_run(monkeypatch, tmp_path, **kwargs):
    """Run ``run_deployment`` up to the submission with every process faked; return what it would start."""
    started, registered = {}, {}

    def start(self, name, command, log=None, env=None):
        started[name] = (list(command), dict(env or {}))
        if name == "flwr-run":
            raise _Stop
        self.processes[name] = _FakeProcess()
        return self.processes[name]

    def register(flwr_command, public_keys):
        registered.update(public_keys)
        return {name: 1000 + i for i, name in enumerate(public_keys)}

    monkeypatch.setattr(runner.ProcessGroup, "start", start)
    monkeypatch.setattr(runner, "wait_for_port", lambda *args, **kw: None)
    monkeypatch.setattr(runner, "register_supernodes", register)
    with pytest.raises(_Stop):
        runner.run_deployment(work_dir=tmp_path, quiet=True, superlink_port=9092, **kwargs)
    return started, registered


def _flag(command, flag):
    return command[command.index(flag) + 1] if flag in command else None


def test_insecure_deployment_flags(monkeypatch, tmp_path):
    started, registered = _dry_run(monkeypatch, tmp_path, num_supernodes=2)
    assert set(started) == {"superlink", "supernode-0", "supernode-1", "flwr-run"} and registered == {}
    superlink, _ = started["superlink"]
    assert "--insecure" in superlink and "--enable-supernode-auth" not in superlink
    assert _flag(superlink, "--host") == "127.0.0.1"
    stores = set()
    for index in (0, 1):
        command, env = started[f"supernode-{index}"]
        assert "--insecure" in command and "--auth-supernode-private-key" not in command
        assert _flag(command, "--superlink") == "127.0.0.1:9092" and _flag(command, "--host") == "127.0.0.1"
        assert _flag(command, "--node-config") == f"partition-id={index} num-partitions=2"
        stores.add(env["HOSFL_FLOWER_NODE_STORE"])
    assert len(stores) == 2
    assert "insecure = true" in (tmp_path / "flwr-home" / "config.toml").read_text()


def test_tls_deployment_authenticates_supernodes(monkeypatch, tmp_path):
    started, registered = _dry_run(monkeypatch, tmp_path, num_supernodes=2, tls=True, unregistered_supernodes=1)
    assert set(started) == {"superlink", "supernode-0", "supernode-1", "unregistered-0", "flwr-run"}
    superlink, _ = started["superlink"]
    assert "--enable-supernode-auth" in superlink and "--insecure" not in superlink
    assert _flag(superlink, "--ssl-keyfile") == str(tmp_path / "certificates" / "server.key")
    assert set(registered) == {"supernode-0", "supernode-1"}  # the unregistered one's key is not registered
    for name, partition, partitions in (("supernode-0", 0, 2), ("supernode-1", 1, 2), ("unregistered-0", 2, 3)):
        command, _ = started[name]
        key = Path(_flag(command, "--auth-supernode-private-key"))
        assert key == tmp_path / "keys" / name and _mode(key) == 0o600
        assert _flag(command, "--root-certificates") == str(tmp_path / "certificates" / "ca.pem")
        assert _flag(command, "--node-config") == f"partition-id={partition} num-partitions={partitions}"
        assert "--insecure" not in command
        if name in registered:
            assert registered[name] == key.with_name(f"{name}.pub")
    config = (tmp_path / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in config and "insecure" not in config


def test_ray_head_flags_and_run_config(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "wait_for_ray_head", lambda head: None)
    started, _ = _dry_run(monkeypatch, tmp_path, num_supernodes=2, ray_head=True, ray_head_cpus=2)
    head, env = started["ray-head"]
    assert head[1:4] == ["start", "--head", "--block"] and "--node-ip-address=127.0.0.1" in head
    assert "--num-cpus=2" in head and "--include-dashboard=false" in head
    temp_dir = next(arg.split("=", 1)[1] for arg in head if arg.startswith("--temp-dir="))
    assert env[runner.RAY_MARKER] == temp_dir and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    port = next(arg.split("=", 1)[1] for arg in head if arg.startswith("--port="))
    submitted = " ".join(started["flwr-run"][0])
    assert 'split-server.placement="ray"' in submitted and f'split-server.ray-address="127.0.0.1:{port}"' in submitted


def test_bad_combinations_fail_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="needs TLS"):
        runner.run_deployment(work_dir=tmp_path / "a", node_auth=True)
    with pytest.raises(ValueError, match="unregistered"):
        runner.run_deployment(work_dir=tmp_path / "b", tls=True, node_auth=False, unregistered_supernodes=1)
    with pytest.raises(ValueError, match="restart_supernode"):
        runner.run_deployment(work_dir=tmp_path / "c", num_supernodes=2, restart_supernode=(2, 1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
