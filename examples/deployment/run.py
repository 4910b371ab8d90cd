"""Run a Flower App on a local deployment: one SuperLink and N SuperNodes on 127.0.0.1.

Starts ``flower-superlink`` and ``flower-supernode`` processes (insecure, or with TLS from a
throwaway CA), submits the app with ``flwr run``, waits for the run to finish, and always stops
every process it started. Usable as a script (``python examples/deployment/run.py --help``) or
as a module (:func:`run_deployment`).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import shlex
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
    now = datetime.datetime.now(datetime.timezone.utc)
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
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    paths.key.chmod(0o600)
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


def cmdline(pid: int) -> str:
    """The command line of ``pid`` (empty if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


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


def flower_processes(needles: Iterable[str]) -> dict[int, str]:
    """Live Flower daemons and apps whose command line contains one of ``needles``."""
    needles = [n for n in needles if n]
    found = {}
    for pid in _all_pids():
        cmd = cmdline(pid)
        if _started(pid) is not None and any(name in cmd for name in FLOWER_PROCESSES) and any(n in cmd for n in needles):
            found[pid] = cmd
    return found


class ProcessGroup:
    """Long-running processes started here, each logging to its own file, stopped together by PID.

    Their descendants (``flower-superexec`` and the ``flwr-serverapp`` / ``flwr-clientapp``
    processes it starts) are recorded whenever the group is checked, and stopped too.
    """

    def __init__(self, log_dir: Path, env: Mapping[str, str], cwd: Path) -> None:
        self.log_dir = log_dir
        self.env = dict(env)
        self.cwd = cwd
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._handles: list[IO[bytes]] = []
        self._known: dict[int, int] = {}  # pid -> start time

    def start(self, name: str, command: Sequence[str], log: Path | None = None) -> subprocess.Popen:
        """Start ``command`` with stdout and stderr in ``log`` (default ``<log dir>/<name>.log``)."""
        log = log or self.log_dir / f"{name}.log"
        handle = open(log, "wb")
        self._handles.append(handle)
        handle.write(("$ " + shlex.join(command) + "\n").encode())
        handle.flush()
        process = subprocess.Popen(
            list(command), cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT
        )
        self.processes[name] = process
        self.logs[name] = log
        return process

    def check_running(self, ignore: Iterable[str] = ()) -> None:
        """Raise :class:`DeploymentError` if a process (not in ``ignore``) has exited; record descendants."""
        self.remember_descendants()
        for name, process in self.processes.items():
            if name not in ignore and process.poll() is not None:
                raise DeploymentError(f"{name} exited with code {process.returncode}; see {self.logs[name]}")

    def remember_descendants(self) -> None:
        """Record the current descendants so that they are stopped too."""
        self._known.update(descendants(p.pid for p in self.processes.values() if p.poll() is None))

    def alive(self) -> list[int]:
        """PIDs of the processes started here, and of recorded descendants, that are still running."""
        running = [p.pid for p in self.processes.values() if p.poll() is None]
        return running + [pid for pid, started in self._known.items() if _started(pid) == started]

    def stop(self, strays: Iterable[str] = (), timeout: float = 20.0) -> list[int]:
        """Stop everything by PID; return the PIDs still running (empty on success).

        SIGTERM to the processes started here, then to their descendants, then SIGKILL. Last, Flower
        processes whose command line contains one of ``strays`` (e.g. the work dir or a port) and
        that were not recorded, such as children orphaned during shutdown, are killed too.
        """
        self.remember_descendants()
        for process in self.processes.values():
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
        for pid in flower_processes(strays):
            _signal(pid, signal.SIGKILL)
        for handle in self._handles:
            handle.close()
        deadline = time.monotonic() + 5.0
        while (self.alive() or flower_processes(strays)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return sorted(set(self.alive()) | set(flower_processes(strays)))

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
) -> dict[str, Any]:
    """Wait until ``flwr ls`` reports the run ``finished:*``; return its record.

    The run's log is streamed into ``log_file`` by one ``flwr log --stream`` process, which
    ends when the run finishes; ``flwr ls`` is asked then, and every ``poll_every`` seconds
    if the stream ends early. The run is stopped if it outlives ``timeout``.
    """
    group.start(f"run-{run_id}", [str(BIN / "flwr"), "log", run_id, CONNECTION, "--stream"], log=log_file)
    stream = group.processes[f"run-{run_id}"]
    deadline = time.monotonic() + timeout
    record: dict[str, Any] = {}
    next_poll = time.monotonic() + 30.0
    while True:
        group.check_running(ignore=[f"run-{run_id}", "flwr-run"])
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
) -> dict[str, Any]:
    """Start the deployment, run the app to a final status, stop everything; return the outcome.

    The returned dict has ``run`` (the ``flwr ls`` record; ``run["status"]`` is e.g.
    ``finished:completed``), ``results_dir`` (where the app's ``results-dir`` points, if it has
    that key), ``work_dir``, ``logs`` (name -> log file), ``ports`` and ``leftover_pids`` (empty
    unless stopping failed, which raises). ``min-nodes`` and ``results-dir`` default to
    ``num_supernodes`` and ``<work_dir>/results`` when the app has those keys; ``run_config`` wins.
    """
    if num_supernodes < 1:
        raise ValueError("num_supernodes must be >= 1")
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

    env = dict(os.environ)
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    certs = make_certificates(work / "certificates") if tls else None
    if certs is None:
        link_tls, node_tls = ["--insecure"], ["--insecure"]
    else:
        server_files = ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key)]
        link_tls, node_tls = server_files, ["--root-certificates", str(certs.ca), *server_files]
    write_connection(flwr_home, link_port, certs.ca if certs else None)

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
        "ports": {"superlink": link_port, "supernodes": node_ports},
        "tls": tls,
    }

    def flwr(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=app, env=env, capture_output=True, text=True, timeout=timeout
        )

    try:
        say(f"work dir {work} ({'TLS' if tls else 'insecure'}), SuperLink on {HOST}:{link_port}")
        superlink = group.start(
            "superlink",
            [str(BIN / "flower-superlink"), *link_tls, "--host", HOST, "--port", str(link_port),
             "--database", str(work / "superlink-state.db"), "--disable-runtime-dependency-installation"],
        )
        wait_for_port(link_port, superlink, "flower-superlink")
        for index, port in enumerate(node_ports):
            group.start(
                f"supernode-{index}",
                [str(BIN / "flower-supernode"), *node_tls, "--superlink", f"{HOST}:{link_port}",
                 "--host", HOST, "--port", str(port),
                 "--node-config", f"partition-id={index} num-partitions={num_supernodes}"],
            )
        # Submit while the SuperNodes start: the ServerApp waits for them (min-nodes).
        merged = {**defaults, **overrides}
        command = [str(BIN / "flwr"), "run", str(app), CONNECTION, "--format", "json"]
        if merged:
            command += ["-c", format_run_config(merged)]
        submit = group.start("flwr-run", command)
        for index, port in enumerate(node_ports):
            wait_for_port(port, group.processes[f"supernode-{index}"], f"flower-supernode {index}")
        say(f"{num_supernodes} SuperNode{'s' * (num_supernodes != 1)} on ports {', '.join(map(str, node_ports))}")
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

        record = wait_for_run(run_id, flwr, group, log_dir / f"run-{run_id}.log", timeout)
        outcome["run"] = record
        details = record.get("status-details") or ""
        say(f"run {run_id}: {record.get('status')}" + (f" ({details})" if details not in ("", "N/A") else ""))
    finally:
        leftover = group.stop(strays=[str(work), *(f"{HOST}:{port}" for port in [link_port, *node_ports])])
        outcome["leftover_pids"] = leftover
        if leftover:
            raise DeploymentError(f"processes still running after stop: {leftover}")
        say(f"stopped {len(group.processes)} processes and their children; logs in {log_dir}")
    return outcome


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exits 0 only if the run ends ``finished:completed``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-supernodes", type=int, default=3, help="SuperNodes to start (default 3)")
    parser.add_argument("--run-config", default="", help='passed to flwr run -c, e.g. "num-server-rounds=5"')
    parser.add_argument("--tls", action="store_true", help="TLS everywhere, with a throwaway CA")
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
        )
    except (DeploymentError, ValueError) as error:
        print(f"[deployment] error: {error}", file=sys.stderr)
        return 1
    status = outcome["run"].get("status", "")
    print(f"[deployment] final status: {status}")
    if outcome["results_dir"] and Path(outcome["results_dir"]).is_dir():
        print(f"[deployment] results: {outcome['results_dir']}")
    print(f"[deployment] logs: {Path(outcome['work_dir']) / 'logs'}")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
