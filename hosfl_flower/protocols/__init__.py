"""Protocols, one folder each (``config.py``, ``messages.py``, ``server.py``, ``client.py``), on the
shared bases of :mod:`.base` and :mod:`.messages`, registered once with :func:`register_protocol`.
docs/protocols.md is the contract of each."""

from .base import Link, NodeInfo, ProtocolServer, RunSettings, ServerHooks
from .messages import CatchUp, HelloReply, HelloRequest, ModelSpec, Payload, Reply, ReplyError, SmashedBatch
from .registry import ProtocolSpec, get_protocol, protocols, register_protocol

__all__ = [
    "CatchUp",
    "HelloReply",
    "HelloRequest",
    "Link",
    "ModelSpec",
    "NodeInfo",
    "Payload",
    "ProtocolServer",
    "ProtocolSpec",
    "Reply",
    "ReplyError",
    "RunSettings",
    "ServerHooks",
    "SmashedBatch",
    "get_protocol",
    "protocols",
    "register_protocol",
]
