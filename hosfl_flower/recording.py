"""The per-round log line and the results files every strategy writes."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from logging import INFO
from pathlib import Path
from typing import Any, cast

import torch
from flwr.common.logger import log
from torch import nn


class RunRecorder:
    """Logs one line per round and writes ``rounds.jsonl``, ``final-model.pt`` and ``summary.json``.

    Nothing in ``directory`` is created, truncated or replaced until :meth:`restore` or the first
    :meth:`record` (the strategy calls them once a resume has been validated), so a refused resume
    leaves an earlier run's results as they were; ``rounds.jsonl`` is then replaced atomically.
    """

    def __init__(self, name: str, directory: Path | None, num_rounds: int) -> None:
        self.name = name
        self.directory = directory
        self.num_rounds = num_rounds
        self.rows: list[dict[str, Any]] = []
        self.started = False

    def restore(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Start from the rows of a resumed run (written again, not logged); ``rounds.jsonl`` holds them alone."""
        self.rows = [dict(row) for row in rows]
        self._write_all()

    def record(self, row: Mapping[str, Any]) -> None:
        """Keep, write and log one round's row."""
        if not self.started:
            self._write_all()
        self.rows.append(dict(row))
        if self.directory is not None:
            with open(self.directory / "rounds.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")
        log(INFO, self.line(row))

    def _write_all(self) -> None:
        """Replace ``rounds.jsonl`` by the rows kept so far (a temporary file renamed over it)."""
        self.started = True
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".rounds-", suffix=".jsonl", dir=self.directory)
        try:
            os.chmod(temporary, 0o644)  # as a plainly written file (mkstemp makes it private)
            with os.fdopen(handle, "w") as file:
                file.writelines(json.dumps(row) + "\n" for row in self.rows)
            os.replace(temporary, self.directory / "rounds.jsonl")
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def line(self, row: Mapping[str, Any]) -> str:
        """``[name] round r/T | test acc | loss | train loss | bytes | rejected``."""
        parts = [f"[{self.name}] round {row['round']:>{len(str(self.num_rounds))}}/{self.num_rounds}"]
        if "accuracy" in row:
            parts.append(f"test acc {row['accuracy']:.4f}")
            parts.append(f"loss {row['loss']:.4f}")
        if "train-loss" in row:
            parts.append(f"train loss {row['train-loss']:.4f}")
        parts.append(f"bytes {human_bytes(row.get('bytes.total', 0))}")
        rejected = {k.split(".", 1)[1]: v for k, v in row.items() if k.startswith("rejected.")}
        if rejected:
            parts.append("rejected " + ", ".join(f"{k}={v}" for k, v in rejected.items()))
        return " | ".join(parts)

    def finish(self, model: nn.Module, config: Mapping[str, Any], final: Mapping[str, Any]) -> None:
        """Write the final model (client and server segments, or the whole model) and a summary."""
        if final:
            log(INFO, "[%s] final: %s", self.name, ", ".join(f"{k}={v}" for k, v in final.items()))
        if self.directory is None:
            return
        if hasattr(model, "client") and hasattr(model, "server"):
            client, server = cast(nn.Module, model.client), cast(nn.Module, model.server)
            state = {"client": client.state_dict(), "server": server.state_dict()}
        else:
            state = {"model": model.state_dict()}
        torch.save({**state, "config": dict(config)}, self.directory / "final-model.pt")
        summary = {"strategy": self.name, "config": dict(config), "final": dict(final)}
        (self.directory / "summary.json").write_text(json.dumps(summary, indent=2))


def numeric(row: Mapping[str, Any]) -> dict[str, Any]:
    """The finite int/float entries of a row (what a ``MetricRecord`` can hold)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def human_bytes(count: float) -> str:
    """``199.4 kB`` style."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"
