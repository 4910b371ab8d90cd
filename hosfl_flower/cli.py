"""``flower-simulation``: run a Flower App in Flower's simulation engine without a SuperLink.

Flower dropped its own ``flower-simulation`` after 1.26; this one keeps its usage:
``flower-simulation --app hosfl_flower.app --num-supernodes 10 --run-config "num-server-rounds=5"``.
``--app`` takes a module path (a module with ``build_apps(overrides)`` or ``server_app`` /
``client_app``) or an app directory (its ``pyproject.toml`` names the components).
``--num-cpus-per-client`` / ``--num-gpus-per-client`` are Flower's ``client_resources`` of each ClientApp actor;
``--num-cpus`` caps the CPUs Ray shares among the actors (default: every CPU of the machine).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from .config import ConfigError, all_options, parse_run_config_overrides


def _import_app(app: str):
    """The app's module (imported before the run config is parsed, so the protocols it registers
    contribute their run-config keys) and, for an app directory, its ``[tool.flwr.app]`` table."""
    path = Path(app)
    if not path.is_dir():
        return importlib.import_module(app), None
    pyproject = tomllib.loads((path / "pyproject.toml").read_text())
    flwr_app = pyproject.get("tool", {}).get("flwr", {}).get("app", {})
    components = flwr_app.get("components", {})
    if "serverapp" not in components or "clientapp" not in components:
        raise SystemExit(f"flower-simulation: {path / 'pyproject.toml'} has no [tool.flwr.app.components]")
    sys.path.insert(0, str(path.resolve()))
    return importlib.import_module(components["serverapp"].partition(":")[0]), flwr_app


def _load_app(app: str, overrides: dict[str, Any]):
    module, flwr_app = _import_app(app)
    if flwr_app is not None:
        if hasattr(module, "build_apps"):
            return module.build_apps({**_flatten(flwr_app.get("config", {})), **overrides})
        if overrides:
            raise SystemExit("flower-simulation: --run-config needs an app whose module defines build_apps(overrides)")
        components = flwr_app["components"]
        server_attr = components["serverapp"].partition(":")[2]
        client_module, _, client_attr = components["clientapp"].partition(":")
        return getattr(module, server_attr), getattr(importlib.import_module(client_module), client_attr)
    if hasattr(module, "build_apps"):
        return module.build_apps(overrides)
    if overrides:
        raise SystemExit(f"flower-simulation: --run-config needs {app}.build_apps(overrides)")
    return module.server_app, module.client_app


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess running this package's console scripts: this interpreter's
    scripts first on ``PATH``, unbuffered output, and Ray's accelerator override off (CPU actors)."""
    env = dict(os.environ)
    env.update(
        {
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _read_overrides(item: str) -> dict[str, Any]:
    """``key=value`` pairs, or the (flattened) tables of a ``.toml`` file of them."""
    if item.endswith(".toml") and Path(item).is_file():
        overrides = _flatten(tomllib.loads(Path(item).read_text()))
        options = all_options()
        for key, value in overrides.items():
            if key not in options:
                raise ConfigError(key, value, f"unknown key; known keys: {', '.join(sorted(options))}")
        return overrides
    return parse_run_config_overrides(item)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog="flower-simulation", description=__doc__.splitlines()[0])
    parser.add_argument("--app", required=True, help="module path (hosfl_flower.app) or app directory")
    parser.add_argument("--num-supernodes", type=int, default=10, help="simulated nodes (default 10)")
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        help='overrides, e.g. "num-server-rounds=5 zo.mu=0.001", or a TOML file of them; repeatable (later wins)',
    )
    parser.add_argument("--num-cpus-per-client", type=float, default=1.0, help="Ray CPUs per ClientApp actor")
    parser.add_argument(
        "--num-gpus-per-client",
        type=float,
        default=0.0,
        help="Ray GPUs per ClientApp actor (a fraction shares one GPU, e.g. 0.25; pair it with client.device=cuda)",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        help="CPUs Ray gives the ClientApp actors (default: every CPU; hosfl compare --jobs gives each run its share)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.num_supernodes < 1:
        parser.error("--num-supernodes must be >= 1")
    if args.num_cpus is not None and args.num_cpus < 1:
        parser.error("--num-cpus must be >= 1")
    if not args.num_gpus_per_client >= 0.0:
        parser.error("--num-gpus-per-client must be >= 0")
    if args.num_gpus_per_client > 0.0 and not _cuda_available():
        print(
            f"flower-simulation: --num-gpus-per-client {args.num_gpus_per_client:g}: CUDA is not available on this machine",
            file=sys.stderr,
        )
        return 2
    try:
        _import_app(args.app)
        overrides: dict[str, Any] = {}
        for item in args.run_config:
            overrides.update(_read_overrides(item))
        server_app, client_app = _load_app(args.app, overrides)
    except ConfigError as error:
        print(f"flower-simulation: {error}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": args.num_cpus_per_client, "num_gpus": args.num_gpus_per_client}
    }
    if args.num_cpus is not None:
        backend_config["init_args"] = {"num_cpus": args.num_cpus}
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.num_supernodes,
        backend_config=backend_config,
        verbose_logging=args.verbose,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
