"""The Flower App: ``server_app`` and ``client_app`` (the components ``flwr run .`` loads), and
``build_apps`` for ``flower-simulation`` and for users who pass run-config values in code."""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from .client_app import build_client_app
from .config import resolve_run_config
from .strategies import STRATEGY_CLASSES, FedAvgBaseline, SplitStrategy
from .task import server_model_and_test


def build_strategy(run_config: Mapping[str, Any]) -> SplitStrategy | FedAvgBaseline:
    """The strategy named by ``strategy``, with the model and test data the run config describes."""
    config = resolve_run_config(run_config)
    model, test = server_model_and_test(config)
    return STRATEGY_CLASSES[config["strategy"]](model, test, config)


def build_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ``ServerApp`` that validates the run config, builds the strategy and runs it."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = resolve_run_config(context.run_config, overrides or {})
        torch.set_num_threads(config["torch-threads"])
        strategy = build_strategy(config)
        result = strategy.start(grid=grid, num_rounds=config["num-server-rounds"])
        last = max(result.evaluate_metrics_serverapp)
        log(INFO, "[%s] finished: test accuracy %.4f after %d rounds", strategy.name,
            result.evaluate_metrics_serverapp[last]["accuracy"], last)

    return app


def build_apps(overrides: Mapping[str, Any] | None = None):
    """``(ServerApp, ClientApp)`` for this package; ``overrides`` are run-config values that win.

    The config is validated here too, so a bad value fails before any simulation starts.
    """
    resolve_run_config(overrides or {})
    return build_server_app(overrides), build_client_app(overrides)


_apps = build_apps()
server_app = _apps[0]
client_app = _apps[1]
