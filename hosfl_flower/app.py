"""The Flower App: ``server_app`` and ``client_app`` (the components ``flwr run .`` loads), and
``build_apps`` for ``flower-simulation`` and for users who pass run-config values in code."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from logging import INFO
from typing import Any

import torch
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from .config import resolve_run_config
from .flower.client_app import build_client_app
from .flower.strategy import HOSFLStrategy
from .node.client import HOSFLClient
from .task import partition_sizes, server_model_and_test


class _ToFlowerLog(logging.Handler):
    """Re-emits the package's records through Flower's logger."""

    def emit(self, record: logging.LogRecord) -> None:
        log(record.levelno, "%s", record.getMessage())


@contextmanager
def package_log_in_flower() -> Iterator[None]:
    """Show the package's INFO records (e.g. which checkpoint was loaded and what was newly initialised) in
    Flower's log for a while. Only the ServerApp does this, so a run says it once, not once per ClientApp."""
    logger = logging.getLogger("hosfl_flower")
    handler, level = _ToFlowerLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def build_strategy(run_config: Mapping[str, Any], strategy_class: type[HOSFLStrategy] = HOSFLStrategy) -> HOSFLStrategy:
    """The strategy running the protocol named by ``strategy``, with the model and test data the run config describes."""
    config = resolve_run_config(run_config)
    model, test = server_model_and_test(config)
    return strategy_class(model, test, config, partition_sizes=partial(partition_sizes, config))


def build_server_app(
    overrides: Mapping[str, Any] | None = None, strategy_class: type[HOSFLStrategy] = HOSFLStrategy
) -> ServerApp:
    """A ``ServerApp`` that validates the run config, builds the strategy (``strategy_class``) and runs it."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = resolve_run_config(context.run_config, overrides or {})
        torch.set_num_threads(config["torch-threads"])
        with package_log_in_flower():
            strategy = build_strategy(config, strategy_class)
        result = strategy.start(grid=grid, num_rounds=config["num-server-rounds"])
        last = max(result.evaluate_metrics_serverapp)
        log(
            INFO,
            "[%s] finished: test accuracy %.4f after %d rounds",
            strategy.name,
            result.evaluate_metrics_serverapp[last]["accuracy"],
            last,
        )

    return app


def build_apps(
    overrides: Mapping[str, Any] | None = None,
    strategy_class: type[HOSFLStrategy] = HOSFLStrategy,
    client_class: type[HOSFLClient] = HOSFLClient,
) -> tuple[ServerApp, ClientApp]:
    """``(ServerApp, ClientApp)`` for this package; ``overrides`` are run-config values that win, and
    ``strategy_class`` / ``client_class`` are the subclasses to run on the server and on every node.

    The config is validated here too, so a bad value fails before any simulation starts.
    """
    resolve_run_config(overrides or {})
    return build_server_app(overrides, strategy_class), build_client_app(overrides, client_class)


_apps = build_apps()
server_app = _apps[0]
client_app = _apps[1]
