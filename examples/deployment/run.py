"""Run a Flower App on a local deployment: one SuperLink and N SuperNodes on 127.0.0.1.

Starts ``flower-superlink`` and ``flower-supernode`` processes (insecure, or with TLS from a
throwaway CA and, by default with TLS, SuperNode authentication: a key pair per SuperNode, each
public key registered with the SuperLink), submits the app with ``flwr run``, waits for the run to
finish, and always stops every process it started. With ``--ray-head`` it also starts a single-node Ray
cluster on 127.0.0.1 for the run and places the split server there as a Ray actor. Usable as a script (``python
examples/deployment/run.py --help``) or as a module (:func:`run_deployment`).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the environment's console scripts: flwr, flower-superlink, ...
CONNECTION = "deployment"
HOST = "127.0.0.1"


class DeploymentError(RuntimeError):
    """The deployment could not start, or the run did not reach a final status."""


# --------------------------------------------------------------------------- ports and TLS
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, name: str, timeout: float = 60.0) -> None:
    """Wait until something listens on ``127.0.0.1:port``; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentError(f"{name} exited with code {process.returncode} before listening on port {port}")
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise DeploymentError(f"{name} did not listen on port {port} within {timeout:.0f}s")


def write_private(path: Path, data: bytes) -> Path:
    """Write a private key that only its owner can read, from the moment the file exists.

    The file is created with mode 0600 by ``open`` itself (``O_CREAT | O_EXCL``, so never through a file or
    link already there: an old one is removed first), whatever the umask; it is never readable by others.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # the umask can only clear bits; this states the mode outright
        handle.write(data)
    return path


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair (OpenSSH format, EC P-384, as Flower's CLI expects)."""

    private: Path
    public: Path


def make_node_key(directory: Path, name: str) -> NodeKey:
    """Create ``<name>`` (private key, mode 0600) and ``<name>.pub`` (public key) in ``directory``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = write_private(
        directory / name,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
    )
    public = directory / f"{name}.pub"
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return NodeKey(private, public)


@dataclass(frozen=True)
class Certificates:
    """PEM files of a throwaway CA and of a server certificate signed by it."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(directory: Path) -> Certificates:
    """Create a CA and a server certificate for 127.0.0.1 / localhost (EC P-256, valid one day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hosfl-flower deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    paths = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(
        paths.key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return paths


# --------------------------------------------------------------------------- processes
FLOWER_PROCESSES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp")


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, parent pid, start time)`` of a process, or ``None`` if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def _started(pid: int) -> int | None:
    """The start time of a live (not zombie) process: with the PID, it names the process uniquely."""
    stat = _proc_stat(pid)
    return stat[2] if stat is not None and stat[0] not in ("Z", "X") else None


def _clock_ticks_now() -> int:
    """Now, in the unit of :func:`_started` (clock ticks since boot)."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def argv(pid: int) -> list[str]:
    """The arguments of ``pid``, exactly as it was started (empty if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1 if raw.endswith(b"\0") else None]]


def cmdline(pid: int) -> str:
    """The command line of ``pid``, for messages (empty if it is gone)."""
    return shlex.join(argv(pid))


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def descendants(roots: Iterable[int]) -> dict[int, int]:
    """Every live descendant of ``roots``, with its start time."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
    found: dict[int, int] = {}
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            started = _started(child)
            if child not in found and started is not None:
                found[child] = started
                stack.append(child)
    return found


def flower_program(args: Sequence[str]) -> str | None:
    """Which Flower program ``args`` runs (one of :data:`FLOWER_PROCESSES`), or ``None``.

    The program is the first argument, or the script a Python interpreter was started with (console
    scripts run as ``python /path/to/flwr-clientapp ...``); its file name must be the program's name.
    """
    if not args:
        return None
    first = Path(args[0]).name
    if re.fullmatch(r"python[0-9.]*", first) and len(args) > 1:
        first = Path(args[1]).name
    return first if first in FLOWER_PROCESSES else None


def names_one_of(args: Sequence[str], needles: Iterable[str]) -> bool:
    """Whether one argument (or the value of a ``--flag=value`` argument) is one of ``needles`` exactly; an
    absolute path needle also matches a path inside it (``/w/run`` matches ``/w/run/db``, not ``/w/run-2``)."""
    needles = [n for n in needles if n]
    dirs = [n.rstrip("/") + "/" for n in needles if n.startswith("/")]
    for arg in args:
        for value in (arg, arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else None):
            if value is not None and (value in needles or any(value.startswith(d) for d in dirs)):
                return True
    return False


def flower_processes(needles: Iterable[str], since: int = 0) -> dict[int, str]:
    """Live Flower processes (by program name) started at or after ``since`` (clock ticks since boot) that
    have an argument naming one of ``needles`` exactly (:func:`names_one_of`), with their command lines."""
    needles = list(needles)
    return _processes_since(since, lambda pid, args: flower_program(args) is not None and names_one_of(args, needles))


def _processes_since(since: int, matches: Callable[[int, list[str]], bool]) -> dict[int, str]:
    """Live processes started at or after ``since`` (clock ticks since boot) that ``matches(pid, argv)``,
    with their command lines."""
    found = {}
    for pid in _all_pids():
        started = _started(pid)
        if started is None or started < since:
            continue
        args = argv(pid)
        if matches(pid, args):
            found[pid] = shlex.join(args)
    return found


# --------------------------------------------------------------------------- a local Ray head
RAY_MARKER = "HOSFL_DEPLOYMENT_RAY_HEAD"
"""Set (to the head's temp dir) in the environment of ``ray start`` for a run; Ray's processes inherit it."""
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Ray's single-machine mode: the node's IP stays 127.0.0.1 (on Linux Ray replaces a loopback address by the
machine's IP), so every Ray port binds to loopback; a driver (the ServerApp) needs it too to dial 127.0.0.1."""
UNIX_SOCKET_LIMIT = 107
RAY_SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")


@dataclass
class RayHead:
    """A single-node Ray cluster started for one run (``ray start --head --block``, a child of the runner)."""

    port: int
    temp_dir: Path
    own_temp_dir: bool  # a short directory created under /tmp (the work dir's path was too long), removed at the end
    process: subprocess.Popen
    log: Path
    command: list[str]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def ray_temp_dir(work: Path) -> tuple[Path, bool]:
    """Ray's ``--temp-dir`` for a run: ``<work>/ray`` if its socket paths stay within the Unix limit, else a
    new short directory under /tmp (the ``bool``: whether it must be removed at the end)."""
    candidate = work / "ray"
    if len(str(candidate)) + RAY_SOCKET_SUFFIX <= UNIX_SOCKET_LIMIT:
        candidate.mkdir(parents=True, exist_ok=True)
        return candidate, False
    return Path(tempfile.mkdtemp(prefix="hosfl-ray-", dir="/tmp" if Path("/tmp").is_dir() else None)), True


def ray_head_command(port: int, temp_dir: Path, num_cpus: int) -> list[str]:
    """``ray start --head --block`` on 127.0.0.1 at ``port``, with ``num_cpus`` CPUs and no dashboard; the
    ports that default to fixed numbers (Ray Client 10001, the dashboard agent 52365) get free ones."""
    return [
        str(BIN / "ray"), "start", "--head", "--block", f"--node-ip-address={HOST}", f"--port={port}",
        f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
    ]


def start_ray_head(
    start: Callable[..., subprocess.Popen], work: Path, num_cpus: int = 1, log_dir: Path | None = None
) -> RayHead:
    """Start a Ray head with ``start(name, command, log=..., env=...)`` (:meth:`ProcessGroup.start`); the caller
    waits for it (:func:`wait_for_ray_head`) and stops it by PID."""
    port = free_port()
    temp_dir, own = ray_temp_dir(work)
    log = (log_dir or work) / "ray-head.log"
    env = {**RAY_LOOPBACK_ENV, RAY_MARKER: str(temp_dir)}
    command = ray_head_command(port, temp_dir, num_cpus)
    try:
        process = start("ray-head", command, log=log, env=env)
    except BaseException:
        if own:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return RayHead(port, temp_dir, own, process, log, command)


def wait_for_ray_head(head: RayHead, timeout: float = 90.0) -> None:
    """Wait until the head's GCS listens and ``ray start`` reports the runtime started (its raylet is up)."""
    wait_for_port(head.port, head.process, "ray start --head", timeout)
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in head.log.read_text(errors="replace"):
        if head.process.poll() is not None:
            raise DeploymentError(f"ray start --head exited with code {head.process.returncode}; see {head.log}")
        if time.monotonic() > deadline:
            raise DeploymentError(f"the Ray head did not start within {timeout:.0f}s; see {head.log}")
        time.sleep(0.2)


def _environ_has(pid: int, name: str, value: str) -> bool:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{name}={value}".encode() in raw.split(b"\0")


def ray_program(args: Sequence[str]) -> bool:
    """Whether ``args`` is one of Ray's processes: ``gcs_server``, ``raylet``, a ``ray`` command or script run
    from the ``ray`` package, or a worker (which renames itself ``ray::...``)."""
    if not args:
        return False
    if args[0].startswith("ray::"):
        return True
    names = [Path(arg).name for arg in args[:2]]
    if any(name in ("gcs_server", "raylet", "ray") for name in names):
        return True
    return any("/ray/" in arg for arg in args[:3])


def ray_processes(temp_dir: str, address: str, since: int = 0) -> dict[int, str]:
    """Live Ray processes of the head whose temp dir is ``temp_dir``, started at or after ``since``: those
    whose environment carries :data:`RAY_MARKER` for it (workers rename themselves, so arguments cannot
    tell), or a Ray program with an argument naming the temp dir (or a path in it) or ``address``."""
    return _processes_since(
        since,
        lambda pid, args: _environ_has(pid, RAY_MARKER, temp_dir)
        or bool(ray_program(args) and names_one_of(args, [temp_dir, address])),
    )


class ProcessGroup:
    """Long-running processes started here, each logging to its own file, stopped together by PID.

    Their descendants (``flower-superexec`` and the ``flwr-serverapp`` / ``flwr-clientapp``
    processes it starts) are recorded whenever the group is checked, and stopped too. A process
    stopped early (:meth:`retire`) stays recorded until it is gone.
    """

    def __init__(self, log_dir: Path, env: Mapping[str, str], cwd: Path) -> None:
        self.log_dir = log_dir
        self.env = dict(env)
        self.cwd = cwd
        self.processes: dict[str, subprocess.Popen] = {}
        self.retired: list[subprocess.Popen] = []
        self.logs: dict[str, Path] = {}
        self._handles: list[IO[bytes]] = []
        self._known: dict[int, int] = {}  # pid -> start time
        self.since = _clock_ticks_now()  # nothing started before this is ours

    def start(
        self, name: str, command: Sequence[str], log: Path | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen:
        """Start ``command`` with stdout and stderr in ``log`` (default ``<log dir>/<name>.log``);
        ``env`` is added to the group's environment."""
        log = log or self.log_dir / f"{name}.log"
        handle = open(log, "wb")
        self._handles.append(handle)
        handle.write(("$ " + shlex.join(command) + "\n").encode())
        handle.flush()
        process = subprocess.Popen(
            list(command), cwd=self.cwd, env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=handle, stderr=subprocess.STDOUT,
        )
        self.processes[name] = process
        self.logs[name] = log
        return process

    def check_running(self, ignore: Iterable[str] = ()) -> None:
        """Raise :class:`DeploymentError` if a process (not in ``ignore``) has exited; record descendants."""
        self.remember_descendants()
        ignore = set(ignore)
        for name, process in self.processes.items():
            if name not in ignore and process.poll() is not None:
                raise DeploymentError(f"{name} exited with code {process.returncode}; see {self.logs[name]}")

    def remember_descendants(self) -> None:
        """Record the current descendants so that they are stopped too."""
        live = [p.pid for p in [*self.processes.values(), *self.retired] if p.poll() is None]
        self._known.update(descendants(live))

    def alive(self) -> list[int]:
        """PIDs of the processes started here, and of recorded descendants, that are still running."""
        running = [p.pid for p in [*self.processes.values(), *self.retired] if p.poll() is None]
        return running + [pid for pid, started in self._known.items() if _started(pid) == started]

    def retire(self, name: str, timeout: float = 20.0) -> int | None:
        """Stop one process now (SIGTERM, then SIGKILL after ``timeout``); return its exit code."""
        process = self.processes.pop(name)
        self.retired.append(process)
        self.remember_descendants()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5.0)
        return process.returncode

    def stop(
        self, strays: Iterable[str] = (), timeout: float = 20.0, ray_heads: Iterable[RayHead] = ()
    ) -> list[int]:
        """Stop everything by PID; return the PIDs still running (empty on success).

        SIGTERM to the processes started here, then to their descendants, then SIGKILL. Last, Flower
        processes started since the group was created with an argument that names one of ``strays``
        exactly (the work dir, or a path in it; an address such as ``127.0.0.1:<port>``), and Ray
        processes of ``ray_heads`` (:func:`ray_processes`), not recorded because they were orphaned
        during shutdown before they were seen, are killed too.
        """
        heads = list(ray_heads)
        self.remember_descendants()
        for process in [*self.processes.values(), *self.retired]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        self._wait(timeout / 2)
        for pid in self.alive():
            _signal(pid, signal.SIGTERM)
        self._wait(timeout / 2)
        for pid in self.alive():
            _signal(pid, signal.SIGKILL)
        self._wait(5.0)
        strays = list(strays)
        for pid in self._strays(strays, heads):
            _signal(pid, signal.SIGKILL)
        for handle in self._handles:
            handle.close()
        deadline = time.monotonic() + 5.0
        while (self.alive() or self._strays(strays, heads)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return sorted(set(self.alive()) | self._strays(strays, heads))

    def _strays(self, strays: Sequence[str], heads: Sequence[RayHead]) -> set[int]:
        found = set(flower_processes(strays, self.since))
        for head in heads:
            found |= set(ray_processes(str(head.temp_dir), head.address, self.since))
        return found

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- flwr CLI
def _json_payload(stdout: str) -> dict[str, Any]:
    start = stdout.find("{")
    if start < 0:
        raise DeploymentError(f"no JSON in flwr output: {stdout[-2000:]}")
    return json.loads(stdout[start:])


def write_connection(flwr_home: Path, port: int, root_certificates: Path | None) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one default connection to the local SuperLink."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{HOST}:{port}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates.resolve()))}")
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def app_config_keys(app_dir: Path) -> set[str]:
    """Flattened keys of ``[tool.flwr.app.config]`` in the app's ``pyproject.toml``."""
    config = tomllib.loads((app_dir / "pyproject.toml").read_text()).get("tool", {}).get("flwr", {})
    keys: set[str] = set()

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                keys.add(f"{prefix}{key}")

    walk(config.get("app", {}).get("config", {}), "")
    return keys


def parse_run_config(run_config: str) -> dict[str, Any]:
    """``"k1=v1 k2='v2'"`` (or a TOML file) as Flower parses it, with flattened keys."""
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([run_config])) if run_config.strip() else {}


def format_run_config(values: Mapping[str, Any]) -> str:
    """Flattened run-config values as one ``flwr run -c`` string."""
    import tomli_w

    return " ".join(tomli_w.dumps({"v": value}).strip().replace("v = ", f"{key}=", 1) for key, value in values.items())


def wait_for_run(
    run_id: str,
    flwr: Callable[..., subprocess.CompletedProcess],
    group: ProcessGroup,
    log_file: Path,
    timeout: float,
    poll_every: float = 3.0,
    ignore: Iterable[str] = (),
    tick: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Wait until ``flwr ls`` reports the run ``finished:*``; return its record.

    The run's log is streamed into ``log_file`` by one ``flwr log --stream`` process, which
    ends when the run finishes; ``flwr ls`` is asked then, and every ``poll_every`` seconds
    if the stream ends early. The run is stopped if it outlives ``timeout``. Processes named in
    ``ignore`` may exit; ``tick`` is called twice a second.
    """
    group.start(f"run-{run_id}", [str(BIN / "flwr"), "log", run_id, CONNECTION, "--stream"], log=log_file)
    stream = group.processes[f"run-{run_id}"]
    ignored = [f"run-{run_id}", "flwr-run", *ignore]
    deadline = time.monotonic() + timeout
    record: dict[str, Any] = {}
    next_poll = time.monotonic() + 30.0
    while True:
        group.check_running(ignore=ignored)
        if tick is not None:
            tick()
        if stream.poll() is not None or time.monotonic() >= next_poll:
            listed = flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json")
            runs = _json_payload(listed.stdout).get("runs", []) if listed.returncode == 0 else []
            record = runs[0] if runs else record
            if str(record.get("status", "")).startswith("finished:"):
                return record
            next_poll = time.monotonic() + (poll_every if stream.poll() is not None else 30.0)
        if time.monotonic() > deadline:
            flwr("stop", run_id, CONNECTION)
            raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f}s (last: {record})")
        time.sleep(0.5)


def register_supernodes(
    flwr_command: Callable[[Sequence[str]], subprocess.Popen], public_keys: Mapping[str, Path]
) -> dict[str, int]:
    """Register each SuperNode's public key with the SuperLink (``flwr supernode register``, through the
    Control API); return the node id the SuperLink gave each. All at once: each is a CLI start."""
    started = {
        name: flwr_command(["supernode", "register", str(key), CONNECTION, "--format", "json"])
        for name, key in public_keys.items()
    }
    node_ids = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=120)
        payload = _json_payload(stdout) if "{" in stdout else {}
        if process.returncode != 0 or not payload.get("success"):
            detail = payload.get("error-message") or (stdout + stderr)[-2000:]
            raise DeploymentError(f"registering {name} ({public_keys[name]}) failed: {detail}")
        node_ids[name] = int(payload["node-id"])
    return node_ids


@dataclass
class Restart:
    """Stop SuperNode ``index`` once the run log shows round ``after_round``, keep it down ``downtime``
    seconds, and start it again with the same command (key, partition, port, node store)."""

    index: int
    after_round: int
    downtime: float = 10.0
    phase: str = "waiting"  # waiting -> down -> done
    stopped_at: float | None = None
    started_at: float | None = None
    exit_code: int | None = None

    def round_logged(self, log_file: Path) -> bool:
        """Whether the ServerApp's log has its line for round ``after_round`` (``... round r/T ...``)."""
        try:
            text = log_file.read_text(errors="replace")
        except OSError:
            return False
        return re.search(rf"\bround\s+{self.after_round}/\d+", text) is not None

    def as_dict(self) -> dict[str, Any]:
        keys = ("index", "after_round", "downtime", "phase", "stopped_at", "started_at", "exit_code")
        return {key: getattr(self, key) for key in keys}


# --------------------------------------------------------------------------- the deployment
def run_deployment(
    num_supernodes: int = 3,
    run_config: str = "",
    tls: bool = False,
    work_dir: Path | str | None = None,
    app_dir: Path | str = REPO_ROOT,
    superlink_port: int | None = None,
    supernode_ports: Sequence[int] | None = None,
    timeout: float = 900.0,
    quiet: bool = False,
    node_auth: bool | None = None,
    unregistered_supernodes: int = 0,
    restart_supernode: tuple[int, int] | None = None,
    restart_downtime: float = 10.0,
    ray_head: bool = False,
    ray_head_cpus: int = 1,
) -> dict[str, Any]:
    """Start the deployment, run the app to a final status, stop everything; return the outcome.

    ``node_auth`` (default: on with ``tls``; Flower allows it only with TLS) starts the SuperLink with
    ``--enable-supernode-auth``, creates a key pair per SuperNode, registers each public key with
    ``flwr supernode register`` and starts each SuperNode with ``--auth-supernode-private-key``.
    ``unregistered_supernodes`` more SuperNodes are started with keys that are not registered (the
    SuperLink must refuse them; they claim partitions ``N, N+1, ...``). ``restart_supernode=(i, r)``
    stops SuperNode ``i`` once the run log shows round ``r`` and starts it again ``restart_downtime``
    seconds later, with the same key, partition, port and node store. ``ray_head`` starts a single-node Ray
    cluster on 127.0.0.1 (``ray start --head --block``, ``ray_head_cpus`` CPUs, its temp dir ``<work_dir>/ray``
    or a short one under /tmp) as a child of this process, sets ``split-server.placement='ray'`` and
    ``split-server.ray-address`` to it in the run config, and stops it by PID at the end.

    The returned dict has ``run`` (the ``flwr ls`` record; ``run["status"]`` is e.g.
    ``finished:completed``), ``results_dir`` (where the app's ``results-dir`` points, if it has
    that key), ``work_dir``, ``logs`` (name -> log file), ``ports``, ``node_auth``, ``node_ids``
    (SuperNode name -> the id its registration got), ``refused`` (unregistered SuperNode name -> its
    exit code, ``None`` if it was still running), ``restart`` (what the restart did, or ``None``), ``ray``
    (the Ray head's ``address``, ``temp_dir``, ``pid`` and ``command``, or ``None``) and
    ``leftover_pids`` (empty unless stopping failed, which raises). ``min-nodes`` and ``results-dir``
    default to ``num_supernodes`` and ``<work_dir>/results`` when the app has those keys; ``run_config`` wins.
    """
    if num_supernodes < 1:
        raise ValueError("num_supernodes must be >= 1")
    node_auth = tls if node_auth is None else node_auth
    if node_auth and not tls:
        raise ValueError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth with --insecure)")
    if unregistered_supernodes and not node_auth:
        raise ValueError("unregistered SuperNodes are only refused with SuperNode authentication")
    restart = Restart(*restart_supernode, downtime=restart_downtime) if restart_supernode else None
    if restart is not None and not (0 <= restart.index < num_supernodes and restart.after_round >= 1):
        raise ValueError(f"restart_supernode={restart_supernode}: needs a SuperNode index < {num_supernodes} and a round >= 1")
    if ray_head_cpus < 0:
        raise ValueError("ray_head_cpus must be >= 0")
    if ray_head and "split-server.ray-address" not in app_config_keys(Path(app_dir).resolve()):
        raise ValueError("--ray-head needs an app with the split-server.placement and split-server.ray-address keys")
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="flwr-deployment-"))
    work = work.resolve()
    app = Path(app_dir).resolve()
    log_dir, flwr_home = work / "logs", work / "flwr-home"
    log_dir.mkdir(parents=True, exist_ok=True)
    say = (lambda *_: None) if quiet else (lambda message: print(f"[deployment] {message}", flush=True))

    link_port = superlink_port or free_port()
    node_ports = list(supernode_ports) if supernode_ports else [free_port() for _ in range(num_supernodes)]
    if len(node_ports) != num_supernodes:
        raise ValueError(f"{len(node_ports)} SuperNode ports given for {num_supernodes} SuperNodes")
    extra_ports = [free_port() for _ in range(unregistered_supernodes)]

    env = dict(os.environ)
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if ray_head:
        env.update(RAY_LOOPBACK_ENV)  # the ServerApp, a Ray driver, dials the head on 127.0.0.1
    certs = make_certificates(work / "certificates") if tls else None
    if certs is None:
        link_tls, node_tls = ["--insecure"], ["--insecure"]
    else:
        server_files = ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key)]
        link_tls, node_tls = server_files, ["--root-certificates", str(certs.ca), *server_files]
    write_connection(flwr_home, link_port, certs.ca if certs else None)

    # SuperNode name -> (port, partition id, number of partitions, key or None)
    nodes: dict[str, tuple[int, int, int, NodeKey | None]] = {}
    total = num_supernodes + unregistered_supernodes
    for index, port in enumerate(node_ports):
        key = make_node_key(work / "keys", f"supernode-{index}") if node_auth else None
        nodes[f"supernode-{index}"] = (port, index, num_supernodes, key)
    for extra, port in enumerate(extra_ports):
        key = make_node_key(work / "keys", f"unregistered-{extra}")
        nodes[f"unregistered-{extra}"] = (port, num_supernodes + extra, total, key)
    unregistered = [name for name in nodes if name.startswith("unregistered-")]

    def supernode(name: str) -> tuple[list[str], dict[str, str]]:
        """The command of SuperNode ``name``, and its own environment (its node store)."""
        port, partition, partitions, key = nodes[name]
        command = [str(BIN / "flower-supernode"), *node_tls, "--superlink", f"{HOST}:{link_port}",
                   "--host", HOST, "--port", str(port),
                   "--node-config", f"partition-id={partition} num-partitions={partitions}"]
        if key is not None:
            command += ["--auth-supernode-private-key", str(key.private)]
        return command, {"HOSFL_FLOWER_NODE_STORE": str(work / "node-store" / name)}

    keys = app_config_keys(app)
    defaults: dict[str, Any] = {}
    if "min-nodes" in keys:
        defaults["min-nodes"] = num_supernodes
    if "results-dir" in keys:
        defaults["results-dir"] = str(work / "results")
    overrides = parse_run_config(run_config)
    results = overrides.get("results-dir", defaults.get("results-dir"))
    results_dir = (work / results).resolve() if results else None  # relative: against the SuperLink's cwd

    group = ProcessGroup(log_dir, env, cwd=work)
    outcome: dict[str, Any] = {
        "work_dir": str(work),
        "results_dir": str(results_dir) if results_dir else None,
        "logs": group.logs,
        "ports": {"superlink": link_port, "supernodes": node_ports, "unregistered": extra_ports},
        "tls": tls,
        "node_auth": node_auth,
        "node_ids": {},
        "refused": {},
        "restart": None,
        "ray": None,
    }
    head: RayHead | None = None

    def flwr(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=app, env=env, capture_output=True, text=True, timeout=timeout
        )

    def flwr_background(args: Sequence[str]) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "flwr"), *args], cwd=app, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def tick(log_file: Path) -> None:
        if restart is None or restart.phase == "done":
            return
        name = f"supernode-{restart.index}"
        if restart.phase == "waiting" and restart.round_logged(log_file):
            restart.exit_code = group.retire(name)
            restart.phase, restart.stopped_at = "down", time.monotonic()
            say(f"stopped {name} after round {restart.after_round} (exit code {restart.exit_code})")
        elif restart.phase == "down" and time.monotonic() - (restart.stopped_at or 0.0) >= restart.downtime:
            command, node_env = supernode(name)
            group.start(f"{name}-restarted", command, env=node_env)
            restart.phase, restart.started_at = "done", time.monotonic()
            say(f"started {name} again (same key, partition, port and node store)")

    try:
        auth = "with SuperNode authentication" if node_auth else "without SuperNode authentication"
        say(f"work dir {work} ({'TLS' if tls else 'insecure'}, {auth}), SuperLink on {HOST}:{link_port}")
        if ray_head:  # it starts while the SuperLink does
            head = start_ray_head(group.start, work, ray_head_cpus, log_dir)
            outcome["ray"] = {"address": head.address, "temp_dir": str(head.temp_dir), "pid": head.process.pid,
                              "command": shlex.join(head.command)}
        superlink = group.start(
            "superlink",
            [str(BIN / "flower-superlink"), *link_tls, "--host", HOST, "--port", str(link_port),
             "--database", str(work / "superlink-state.db"), "--disable-runtime-dependency-installation",
             *(["--enable-supernode-auth"] if node_auth else [])],
        )
        wait_for_port(link_port, superlink, "flower-superlink")
        if node_auth:
            public_keys = {name: key.public for name, (_, _, _, key) in nodes.items() if key and name not in unregistered}
            outcome["node_ids"] = register_supernodes(flwr_background, public_keys)
            say(f"registered {len(public_keys)} SuperNode public keys")
        for name in nodes:
            command, node_env = supernode(name)
            group.start(name, command, env=node_env)
        # Submit while the SuperNodes start: the ServerApp waits for them (min-nodes).
        merged = {**defaults, **overrides}
        if head is not None:
            wait_for_ray_head(head)
            merged.update({"split-server.placement": "ray", "split-server.ray-address": head.address})
            say(f"Ray head on {head.address} (temp dir {head.temp_dir})")
        command = [str(BIN / "flwr"), "run", str(app), CONNECTION, "--format", "json"]
        if merged:
            command += ["-c", format_run_config(merged)]
        submit = group.start("flwr-run", command)
        for index, port in enumerate(node_ports):
            wait_for_port(port, group.processes[f"supernode-{index}"], f"flower-supernode {index}")
        say(f"{num_supernodes} SuperNode{'s' * (num_supernodes != 1)} on ports {', '.join(map(str, node_ports))}"
            + (f", {len(unregistered)} with unregistered keys" if unregistered else ""))
        try:
            submit.wait(timeout=180)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"flwr run did not return within 180s; see {group.logs['flwr-run']}") from None
        submitted = group.logs["flwr-run"].read_text()
        payload = _json_payload(submitted[submitted.index("\n"):])
        if not payload.get("success"):
            raise DeploymentError(f"flwr run failed: {payload.get('error-message', submitted[-3000:])}")
        run_id = str(payload["run-id"])
        outcome["run_id"] = run_id
        say(f"submitted run {run_id}")

        run_log = log_dir / f"run-{run_id}.log"
        record = wait_for_run(run_id, flwr, group, run_log, timeout, ignore=unregistered, tick=lambda: tick(run_log))
        outcome["run"] = record
        details = record.get("status-details") or ""
        say(f"run {run_id}: {record.get('status')}" + (f" ({details})" if details not in ("", "N/A") else ""))
    finally:
        outcome["refused"] = {name: group.processes[name].poll() for name in unregistered if name in group.processes}
        outcome["restart"] = restart.as_dict() if restart is not None else None
        ports = [link_port, *node_ports, *extra_ports]
        heads = [head] if head is not None else []
        leftover = group.stop(strays=[str(work), *(f"{HOST}:{port}" for port in ports)], ray_heads=heads)
        outcome["leftover_pids"] = leftover
        if head is not None and head.own_temp_dir and not leftover:
            shutil.rmtree(head.temp_dir, ignore_errors=True)
        if leftover:
            raise DeploymentError(f"processes still running after stop: {leftover}")
        say(f"stopped {len(group.processes) + len(group.retired)} processes and their children; logs in {log_dir}")
    return outcome


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _restart_option(value: str) -> tuple[int, int]:
    index, _, after = value.partition(":")
    try:
        return int(index), int(after)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected INDEX:ROUND, got {value!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exits 0 only if the run ends ``finished:completed``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-supernodes", type=int, default=3, help="SuperNodes to start (default 3)")
    parser.add_argument("--run-config", default="", help='passed to flwr run -c, e.g. "num-server-rounds=5"')
    parser.add_argument("--tls", action="store_true", help="TLS everywhere, with a throwaway CA (and SuperNode authentication)")
    parser.add_argument(
        "--no-node-auth", action="store_true", help="with --tls: no SuperNode authentication (any process may join)"
    )
    parser.add_argument(
        "--unregistered-supernodes", type=int, default=0, metavar="N",
        help="with --tls: also start N SuperNodes whose keys are not registered (the SuperLink refuses them)",
    )
    parser.add_argument(
        "--restart-supernode", type=_restart_option, metavar="INDEX:ROUND",
        help="stop SuperNode INDEX once round ROUND is logged and start it again (same key, partition, node store)",
    )
    parser.add_argument("--restart-downtime", type=float, default=10.0, help="seconds the restarted SuperNode stays down")
    parser.add_argument(
        "--ray-head", action="store_true",
        help="start a single-node Ray cluster on 127.0.0.1 for the run and place the split server on it (a Ray actor)",
    )
    parser.add_argument("--ray-head-cpus", type=int, default=1, help="CPUs of the --ray-head cluster (default 1)")
    parser.add_argument("--work-dir", type=Path, help="logs, Flower home, certificates, results (default: a new temp dir)")
    parser.add_argument("--app-dir", type=Path, default=REPO_ROOT, help="Flower App directory (default: the repository)")
    parser.add_argument("--superlink-port", type=int, help="SuperLink port (default: a free port)")
    parser.add_argument("--supernode-ports", help="comma-separated SuperNode ports, one per SuperNode (default: free ports)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the run (default 900)")
    args = parser.parse_args(argv)
    ports = [int(p) for p in args.supernode_ports.split(",")] if args.supernode_ports else None
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that the clean-up in run_deployment runs
    try:
        outcome = run_deployment(
            num_supernodes=args.num_supernodes,
            run_config=args.run_config,
            tls=args.tls,
            work_dir=args.work_dir,
            app_dir=args.app_dir,
            superlink_port=args.superlink_port,
            supernode_ports=ports,
            timeout=args.timeout,
            node_auth=False if args.no_node_auth else None,
            unregistered_supernodes=args.unregistered_supernodes,
            restart_supernode=args.restart_supernode,
            restart_downtime=args.restart_downtime,
            ray_head=args.ray_head,
            ray_head_cpus=args.ray_head_cpus,
        )
    except (DeploymentError, ValueError) as error:
        print(f"[deployment] error: {error}", file=sys.stderr)
        return 1
    status = outcome["run"].get("status", "")
    print(f"[deployment] final status: {status}")
    for name, code in outcome["refused"].items():
        print(f"[deployment] {name} (unregistered key): " + ("still running" if code is None else f"exited with code {code}"))
    if outcome["results_dir"] and Path(outcome["results_dir"]).is_dir():
        print(f"[deployment] results: {outcome['results_dir']}")
    if outcome["ray"]:
        print(f"[deployment] split server on the Ray head at {outcome['ray']['address']} (stopped)")
    print(f"[deployment] logs: {Path(outcome['work_dir']) / 'logs'}")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
