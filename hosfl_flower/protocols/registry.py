"""The protocol registry: one :func:`register_protocol` call makes a protocol a ``strategy`` choice of
the run config, a method of ``hosfl compare`` and of the memory benchmark, and routes its message
types on every node."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..options import Option, Settings
from .base import ProtocolServer
from .messages import HelloRequest, Payload, check_categories

Handler = Callable[[Any, Any, int], Payload]
"""A client handler: ``handler(client, request, server_round) -> reply`` (``client`` is a ``HOSFLClient``)."""


@dataclass(frozen=True)
class ProtocolSpec:
    """A registered protocol."""

    name: str
    server: type[ProtocolServer]
    settings: type[Settings]
    handlers: Mapping[type[Payload], Handler]
    description: str = ""
    memory_step: Callable[..., Any] | None = None
    """``memory_step(client, server_round) -> None``: one client step, for the memory benchmark."""
    checkpoints: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def requests(self) -> tuple[type[Payload], ...]:
        return tuple(self.handlers)


_PROTOCOLS: dict[str, ProtocolSpec] = {}
_HANDLERS: dict[type[Payload], Handler] = {}
_REQUESTS: dict[str, type[Payload]] = {"query.hello": HelloRequest}


def register_protocol(
    name: str,
    server: type[ProtocolServer],
    settings: type[Settings],
    handlers: Mapping[type[Payload], Handler],
    description: str = "",
    memory_step: Callable[..., Any] | None = None,
    checkpoints: bool = True,
) -> ProtocolSpec:
    """Register a protocol under ``name`` (its ``strategy`` value).

    ``server`` is its :class:`~hosfl_flower.protocols.base.ProtocolServer` subclass, ``settings`` its
    :class:`~hosfl_flower.options.Settings` subclass, ``handlers`` maps each request type it sends to
    the node's handler. Request types may be shared between protocols (the same class, the same handler).
    """
    if name in _PROTOCOLS:
        raise ValueError(f"protocol {name!r} is already registered")
    for request, handler in handlers.items():
        if not request.message_type or request.reply_type is None:
            raise ValueError(f"{request.__name__} needs a message_type and a reply_type")
        if request.message_type.split(".")[0] not in ("train", "query", "evaluate"):
            raise ValueError(f"{request.__name__}.message_type {request.message_type!r} must start with train, query or evaluate")
        known = _REQUESTS.get(request.message_type)
        if known is not None and known is not request:
            raise ValueError(f"message type {request.message_type!r} is already used by {known.__name__}")
        if request in _HANDLERS and _HANDLERS[request] is not handler:
            raise ValueError(f"{request.__name__} already has a different handler")
        check_categories(request)
        check_categories(request.reply_type)
    _check_options(settings)
    for request, handler in handlers.items():
        _REQUESTS[request.message_type] = request
        _HANDLERS[request] = handler
    spec = ProtocolSpec(name, server, settings, dict(handlers), description, memory_step, checkpoints)
    _PROTOCOLS[name] = spec
    return spec


def _check_options(settings: type[Settings]) -> None:
    from ..config import CORE_OPTIONS

    known = {**CORE_OPTIONS, **protocol_options()}
    for key, option in settings.options():
        if key in known and known[key] != option:
            raise ValueError(f"run-config key {key!r} of {settings.__name__} differs from its existing definition")


def protocols() -> dict[str, ProtocolSpec]:
    """Every registered protocol by name, in registration order."""
    _ensure_builtins()
    return dict(_PROTOCOLS)


def get_protocol(name: str) -> ProtocolSpec:
    """The protocol registered as ``name``; ``KeyError`` naming the known ones otherwise."""
    registered = protocols()
    if name not in registered:
        raise KeyError(f"unknown protocol {name!r}; registered: {', '.join(registered)}")
    return registered[name]


def protocol_options() -> dict[str, Option]:
    """The run-config keys of every registered protocol's settings."""
    options: dict[str, Option] = {}
    for spec in _PROTOCOLS.values():
        options.update(dict(spec.settings.options()))
    return options


def request_type(message_type: str) -> type[Payload] | None:
    """The request class of a message type, if any protocol sends it."""
    _ensure_builtins()
    return _REQUESTS.get(message_type)


def handler_for(request: type[Payload]) -> Handler:
    """The node's handler of a request type."""
    _ensure_builtins()
    if request not in _HANDLERS:
        raise KeyError(f"no handler registered for {request.__name__}")
    return _HANDLERS[request]


def all_payloads() -> Iterable[type[Payload]]:
    """Every registered request and reply type."""
    _ensure_builtins()
    for request in _REQUESTS.values():
        yield request
        if request.reply_type is not None:
            yield request.reply_type


def _ensure_builtins() -> None:
    from . import builtin  # noqa: F401 - registers the package's protocols on first use
