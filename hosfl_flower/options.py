"""Run-config options and typed settings: one :class:`Option` per key, and :class:`Settings`, the base
of the frozen dataclasses a protocol builds from the run config (each field names its key, default,
help text and allowed values)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar


class ConfigError(ValueError):
    """A run-config value is invalid; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid run-config value {key}={value!r}: {allowed}")


@dataclass(frozen=True)
class Option:
    """One run-config key: its default, type and allowed values."""

    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    @property
    def kind(self) -> type:
        return type(self.default)

    def check(self, key: str, value: Any) -> Any:
        """Return ``value`` converted to the option's type, or raise :class:`ConfigError`."""
        kind = self.kind
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(key, value, "must be true or false")
            return value
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise ConfigError(key, value, f"must be an integer{self._range_text()}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(key, value, f"must be a number{self._range_text()}")
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(key, value, f"must be a finite number{self._range_text()}")
        elif kind is str:
            if not isinstance(value, str):
                raise ConfigError(key, value, "must be a string")
            if self.choices is not None and value not in self.choices:
                raise ConfigError(key, value, f"must be one of {', '.join(self.choices)}")
            return value
        below = self.minimum is not None and (value < self.minimum or (self.exclusive_minimum and value == self.minimum))
        above = self.maximum is not None and value > self.maximum
        if below or above:
            raise ConfigError(key, value, f"must be {'an integer' if kind is int else 'a number'}{self._range_text()}")
        return value

    def _range_text(self) -> str:
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}")
        if self.maximum is not None:
            parts.append(f"<= {self.maximum:g}")
        return (" " + " and ".join(parts)) if parts else ""


def setting(key: str, default: Any, help: str, **check: Any) -> Any:
    """A :class:`Settings` field read from run-config key ``key`` (``check``: :class:`Option` limits)."""
    return dataclasses.field(default=default, metadata={"option": (key, Option(default, help, **check))})


S = TypeVar("S", bound="Settings")


@dataclass(frozen=True)
class Settings:
    """Base of a protocol's typed settings: a frozen dataclass whose fields are :func:`setting` s.

    :meth:`options` lists the run-config keys it reads (the run config accepts them once the
    protocol is registered); :meth:`from_config` builds it from a resolved run config;
    :meth:`check` is the place for checks across keys (raise :class:`ConfigError`).
    """

    overrides: ClassVar[Mapping[str, Any]] = {}
    """Keys this protocol fixes whatever the run config says (e.g. ``zo.num-perturbations=0``)."""

    @classmethod
    def options(cls) -> Iterator[tuple[str, Option]]:
        """``(key, option)`` for every field."""
        for item in dataclasses.fields(cls):
            if "option" in item.metadata:
                yield item.metadata["option"]

    @classmethod
    def from_config(cls: type[S], config: Mapping[str, Any]) -> S:
        """The settings of a resolved run config (with :attr:`overrides` applied), checked."""
        values = {}
        for item in dataclasses.fields(cls):
            if "option" in item.metadata:
                key, option = item.metadata["option"]
                values[item.name] = option.check(key, cls.overrides.get(key, config.get(key, option.default)))
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Checks across fields; raise :class:`ConfigError` naming the key."""
