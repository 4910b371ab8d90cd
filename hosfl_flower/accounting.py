"""Per-round accounting: bytes of every record of every message by category, round trips, compute
seconds. Each message type declares the category of each of its records (docs/protocols.md, "Accounting")."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import Message

CATEGORIES = (
    "activations_up",
    "labels_up",
    "activation_grads_down",
    "model_up",
    "model_down",
    "scalars_up",
    "scalars_down",
    "seeds_and_ledger_down",
    "other",
)

CUT_CATEGORIES = ("activations_up", "labels_up", "activation_grads_down", "scalars_up", "scalars_down")
"""Cut traffic, paid per step: what crosses the cut layer (smashed activations, their labels, activation
gradients, and the scalars that stand for them: HO-SFL's probes, MU-SplitFed's loss differences)."""
WEIGHT_CATEGORIES = ("model_up", "model_down", "seeds_and_ledger_down")
"""Weight traffic: what synchronises the client segment (states, or HO-SFL's seeds and ledger entries)."""


def record_bytes(record) -> int:
    """``record.count_bytes()``; for config/metric records Flower cannot count (empty strings or
    lists, which a misbehaving node may send), the same rule applied value by value."""
    try:
        return record.count_bytes()
    except (ValueError, IndexError):
        total = 0
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            total += len(key) + sum(len(v) if isinstance(v, (str, bytes)) else 1 if isinstance(v, bool) else 8 for v in values)
        return total


def message_bytes(message: Message) -> int:
    """Sum of the bytes of every record of a message (0 for an error reply)."""
    if message.has_error():
        return 0
    return sum(record_bytes(record) for record in message.content.values())


@dataclass
class RoundAccount:
    """What one round cost: bytes per category, round trips, compute seconds."""

    bytes: Counter = field(default_factory=Counter)
    round_trips: int = 0
    messages: int = 0
    client_seconds: float = 0.0
    server_seconds: float = 0.0
    server_averaging: int = 0
    """Bytes a separate fed server would exchange to average per-client server copies (each copy's
    ``θ_s`` up and the average down): counted as the papers count it, not in ``bytes.total``, which is
    what this deployment sends (the copies live in the server's process)."""

    def count(self, message: Message, categories: Mapping[str, str]) -> None:
        """Add the bytes of every record of ``message``: record ``name`` (up to its first ``.``) to
        ``categories[name]``, an undeclared record to ``other``."""
        if message.has_error():
            return
        self.messages += 1
        for name, record in message.content.items():
            self.bytes[categories.get(name.split(".", 1)[0], "other")] += record_bytes(record)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def as_metrics(self) -> dict[str, float | int]:
        """Flat metrics: ``bytes.<category>`` for every category, the total, cut and weight traffic,
        the server-side averaging, round trips and seconds."""
        metrics: dict[str, float | int] = {f"bytes.{c}": int(self.bytes.get(c, 0)) for c in CATEGORIES}
        metrics["bytes.total"] = self.total_bytes
        metrics["bytes.cut"] = sum(int(self.bytes.get(c, 0)) for c in CUT_CATEGORIES)
        metrics["bytes.weights"] = sum(int(self.bytes.get(c, 0)) for c in WEIGHT_CATEGORIES)
        metrics["bytes.server_averaging"] = int(self.server_averaging)
        metrics["round-trips"] = self.round_trips
        metrics["client-seconds"] = self.client_seconds
        metrics["server-seconds"] = self.server_seconds
        return metrics
