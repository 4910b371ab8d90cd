"""The :class:`~hosfl_flower.protocols.base.Link` over Flower's ``Grid``: typed requests become
messages (with a ``config`` record carrying the round), replies are decoded and validated by their
reply type, and every record is accounted in the category its message type declares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..protocols.base import Check, Link, NodeInfo
from ..protocols.messages import ModelSpec, Payload, ReplyError, require_int, require_record

CONFIG_CATEGORIES = {"config": "other"}


def error_text(reply: Message) -> str:
    """The last line of an error reply's reason."""
    reason = reply.error.reason.strip() if reply.error.reason else ""
    return reason.splitlines()[-1] if reason else f"error code {reply.error.code}"


def request_message(request: Payload, node_id: int, server_round: int, extra: Mapping[str, Any] | None = None) -> Message:
    """The Flower message of a typed request, with a ``config`` record holding ``server-round``."""
    content: RecordDict = request.to_record()
    content["config"] = ConfigRecord({**dict(extra or {}), "server-round": int(server_round)})
    return Message(content, dst_node_id=node_id, message_type=request.message_type, group_id=str(server_round))


def server_round_of(content: RecordDict) -> int:
    """The round a request message belongs to (0 when it carries none); :class:`ReplyError` when its
    ``config`` record is not a ``ConfigRecord`` or ``server-round`` is not an integer in ``[0, 2**53]``."""
    if "config" not in content:
        return 0
    return require_int(require_record(content, "config", ConfigRecord), "server-round", default=0)


def reply_type(request: Payload) -> type[Payload]:
    """The reply type a request expects."""
    expected = type(request).reply_type
    if expected is None:
        raise TypeError(f"{type(request).__name__} declares no reply_type")
    return expected


class GridLink(Link):
    """A link that sends through ``grid`` and waits up to ``timeout`` seconds for the replies."""

    def __init__(
        self,
        name: str,
        grid: Grid,
        server_round: int,
        spec: ModelSpec | None,
        timeout: float,
        train_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name)
        self.grid, self.server_round, self.spec, self.timeout = grid, server_round, spec, timeout
        self.train_config = dict(train_config or {})

    def exchange(self, requests: Sequence[tuple[NodeInfo, Payload]], check: Check | None = None) -> dict[NodeInfo, Any]:
        if not requests:
            return {}
        messages = []
        for node, request in requests:
            message = request_message(request, node.node_id, self.server_round, self.train_config)
            self.account.count(message, {**type(request).categories, **CONFIG_CATEGORIES})
            messages.append(message)
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        self.account.round_trips += 1
        # A reply belongs to the request it answers (an error reply Flower makes for an unreachable node
        # carries the SuperLink's id as its source); the source node is the fallback.
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        by_node: dict[int, Message] = {}
        for reply in replies:
            by_node.setdefault(sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id), reply)
        kept: dict[NodeInfo, Any] = {}
        for node, request in requests:
            answer = by_node.get(node.node_id)
            if answer is None:
                self.reject("no-reply", node)
                continue
            self.account.count(answer, reply_type(request).categories)
            decoded = self.decode(answer, request, node)
            if decoded is not None and self.keep(node, decoded, check):
                kept[node] = decoded
        return kept

    def decode(self, reply: Message, request: Payload, node: NodeInfo) -> Any:
        """The typed reply, or ``None`` after counting why it was rejected."""
        if reply.has_error():
            self.reject("error", node, error_text(reply))
            return None
        try:
            return reply_type(request).from_record(reply.content, request, self.spec)
        except ReplyError as error:
            self.reject(error.reason, node, str(error))
        except Exception as error:  # noqa: BLE001 - whatever a node sends, a bad reply is only rejected
            self.reject("malformed", node, f"{type(error).__name__}: {error}")
        return None
