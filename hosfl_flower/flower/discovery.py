"""Waiting for a federation's nodes, learning who they are (``query.hello``), and keeping the node list
current from round to round.

The node list is refreshed at the start of every round with one call to the grid (cheap: no message is
sent unless the list changed). A node that is no longer connected is dropped; a node id not seen
before, or one that Flower has activated again since it answered (a SuperNode restarted with the same
identity keeps its node id under node authentication), is asked ``query.hello`` and handed to the
protocol (``discovered(node, applied_round)``), which catches it up from the round it reports. A node
claiming a partition that a connected node already holds is refused, and counted on the link; one whose
old holder is gone takes its place. Nothing a node answers makes discovery raise.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

from flwr.common.logger import log
from flwr.serverapp import Grid

from ..options import ConfigError
from ..protocols.base import Link, NodeInfo
from ..protocols.messages import HelloReply, HelloRequest, ReplyError

Discovered = Callable[[NodeInfo, int], None]
"""Called with each node added to the list and the round its ``θ_c`` says it has applied."""


def connected_nodes(grid: Any) -> dict[int, str]:
    """The connected node ids, each with when Flower last activated it (``""`` where the grid does not say).

    ``grid.get_nodes()`` costs what ``grid.get_node_ids()`` costs (the deployment grid answers both with
    one request); a grid without it is asked for the ids alone.
    """
    get_nodes = getattr(grid, "get_nodes", None)
    if get_nodes is None:
        return {int(node_id): "" for node_id in grid.get_node_ids()}
    return {int(node.node_id): str(getattr(node, "last_activated_at", "") or "") for node in get_nodes()}


def wait_for_nodes(grid: Grid, wanted: int, explicit: bool, timeout: float) -> dict[int, str]:
    """The connected nodes (:func:`connected_nodes`) once ``wanted`` of them are. Without an explicit
    ``min-nodes`` (``explicit=False``), a node count that stays below ``wanted`` for 15 s is a config error."""
    deadline = time.monotonic() + timeout
    last_count, stable_since = -1, time.monotonic()
    while True:
        nodes = connected_nodes(grid)
        if len(nodes) >= wanted:
            return nodes
        if len(nodes) != last_count:
            last_count, stable_since = len(nodes), time.monotonic()
        if not explicit and nodes and time.monotonic() - stable_since > 15:
            raise ConfigError("clients-per-round", wanted, f"must be <= the number of nodes ({len(nodes)})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of the {wanted} nodes needed connected within {timeout:.0f}s")
        time.sleep(0.2)


@dataclass
class HelloResult:
    """What one :func:`hello` did."""

    added: list[NodeInfo] = field(default_factory=list)
    """The nodes added to ``known`` (in node-id order)."""
    replaced: list[NodeInfo] = field(default_factory=list)
    """Nodes dropped from ``known`` because a new node took their partition (they were no longer connected)."""
    refused: dict[int, int] = field(default_factory=dict)
    """``node id -> partition`` of the nodes refused because a connected node holds the partition they claim."""
    invalid: dict[int, str] = field(default_factory=dict)
    """``node id -> reason`` of the nodes whose identity does not fit the federation (asked again only if they reconnect)."""
    applied_rounds: dict[int, int] = field(default_factory=dict)
    """``node id -> the round its θ_c is at`` of the nodes added."""


class Federation:
    """What the server holds a node's identity against: the federation's number of partitions (the
    claim most nodes make at the first discovery, then fixed) and, where the server can compute them
    (``partition_sizes(num_partitions)``), each partition's number of examples, so that a node cannot
    claim more examples, hence more aggregation weight, than its partition has."""

    def __init__(self, partition_sizes: Callable[[int], Sequence[int]] | None = None) -> None:
        self.partition_sizes = partition_sizes
        self.num_partitions: int | None = None
        self.sizes: list[int] | None = None

    def learn(self, replies: Sequence[HelloReply]) -> None:
        """Fix the number of partitions from the first replies (the most common claim; ties: the smallest)."""
        if self.num_partitions is not None or not replies:
            return
        counts = Counter(reply.num_partitions for reply in replies)
        self.num_partitions = min(counts, key=lambda n: (-counts[n], n))
        if self.partition_sizes is not None:
            self.sizes = [int(n) for n in self.partition_sizes(self.num_partitions)]

    def check(self, reply: HelloReply) -> None:
        """:class:`ReplyError` unless the reply fits the federation."""
        if reply.num_partitions != self.num_partitions:
            raise ReplyError("wrong-federation", f"{reply.num_partitions} partitions, the federation has {self.num_partitions}")
        if self.sizes is not None and reply.num_examples != self.sizes[reply.partition_id]:
            expected = self.sizes[reply.partition_id]
            raise ReplyError("wrong-count", f"partition {reply.partition_id} has {expected} examples, not {reply.num_examples}")


def hello(
    link: Link,
    node_ids: Iterable[int],
    known: dict[int, NodeInfo],
    discovered: Discovered,
    *,
    connected: Collection[int] | None = None,
    federation: Federation | None = None,
) -> HelloResult:
    """Ask every node of ``node_ids`` not in ``known`` who it is; add it and call ``discovered(node, applied_round)``.

    A reply that is missing or invalid, or does not fit the ``federation`` (its number of partitions and,
    where the server knows them, the partition's size), is counted on ``link`` (``no-reply``,
    ``malformed``, ``wrong-federation``, ``wrong-count``, ...) and its node left out. A node claiming a
    partition held by a known node that is still ``connected`` (default: every known node), or by a node
    accepted earlier in the same call, is refused and counted as ``partition-taken``; if the known
    holder is not connected any more, the new node replaces it. Never raises because of what a node
    answers.
    """
    live = set(known) | set(node_ids) if connected is None else set(connected)
    holders = {node.partition_id: node for node in known.values()}
    claimed: dict[int, int] = {}  # partition -> node id accepted in this call
    result = HelloResult()

    def check(probe: NodeInfo, reply: HelloReply) -> None:
        # Checks of the claim come first; the partition is taken only by a reply that passes them all.
        holder = holders.get(reply.partition_id)
        other = claimed.get(reply.partition_id)
        if other is None and holder is not None and holder.node_id in live:
            other = holder.node_id
        if other is not None:
            result.refused[probe.node_id] = reply.partition_id
            raise ReplyError("partition-taken", f"partition {reply.partition_id} is held by node {other}")
        claimed[reply.partition_id] = probe.node_id

    new = [NodeInfo(node_id, -1, 0) for node_id in sorted(set(node_ids)) if node_id not in known]
    replies = link.exchange([(node, HelloRequest()) for node in new])
    federation = federation or Federation()
    federation.learn(list(replies.values()))
    for probe, reply in replies.items():
        try:
            try:
                federation.check(reply)
            except ReplyError as error:
                result.invalid[probe.node_id] = error.reason
                raise
            check(probe, reply)
        except ReplyError as error:
            link.reject(error.reason, probe, str(error))
            continue
        node = NodeInfo(probe.node_id, reply.partition_id, reply.num_examples)
        holder = holders.pop(node.partition_id, None)
        if holder is not None and known.pop(holder.node_id, None) is not None:
            result.replaced.append(holder)
        known[node.node_id] = node
        result.added.append(node)
        result.applied_rounds[node.node_id] = reply.applied_round
        discovered(node, reply.applied_round)
    return result


class NodeDirectory:
    """The nodes the server knows (``nodes``: node id -> :class:`NodeInfo`), kept in step with the grid."""

    def __init__(self, nodes: dict[int, NodeInfo] | None = None, name: str = "", federation: Federation | None = None) -> None:
        self.nodes: dict[int, NodeInfo] = nodes if nodes is not None else {}
        self.name = name
        self.federation = federation or Federation()
        self.activated: dict[int, str] = {}  # node id -> Flower's activation time when it answered hello
        self.refused: dict[int, str] = {}  # node id -> activation time when it was refused a partition
        self.invalid: dict[int, str] = {}  # node id -> activation time when its identity did not fit the federation

    def update(self, link: Link, connected: Mapping[int, str], discovered: Discovered, when: str = "") -> HelloResult:
        """Drop the nodes not ``connected`` (or activated again since they answered), and ask the nodes not
        known (:func:`hello`). A refused node is asked again once a node has left or it reconnects. Changes
        are logged, prefixed with ``when`` (e.g. ``"round 3"``; empty: not logged)."""
        left = [node for nid, node in self.nodes.items() if nid not in connected]
        restarted = [node for nid, node in self.nodes.items() if nid in connected and self._reactivated(nid, connected[nid])]
        for node in left + restarted:
            del self.nodes[node.node_id]
            self.activated.pop(node.node_id, None)
        if left or restarted:
            self.refused.clear()
        self.refused = {nid: at for nid, at in self.refused.items() if connected.get(nid) == at}
        self.invalid = {nid: at for nid, at in self.invalid.items() if connected.get(nid) == at}
        ask = [nid for nid in sorted(connected) if nid not in self.nodes and nid not in self.refused and nid not in self.invalid]
        result = (
            hello(link, ask, self.nodes, discovered, connected=connected, federation=self.federation) if ask else HelloResult()
        )
        for node in result.added:
            self.activated[node.node_id] = connected[node.node_id]
        self.refused.update({nid: connected[nid] for nid in result.refused})
        self.invalid.update({nid: connected[nid] for nid in result.invalid})
        self._log(when, left, restarted, result)
        return result

    def _reactivated(self, node_id: int, activated: str) -> bool:
        """Whether Flower activated a known node again since it answered (it restarted or reconnected)."""
        return node_id in self.activated and self.activated[node_id] != activated

    def _log(self, when: str, left: list[NodeInfo], restarted: list[NodeInfo], result: HelloResult) -> None:
        if not when:
            return
        where = f"[{self.name}] {when}:"
        for node in left:
            log(INFO, "%s partition %d left (node %d)", where, node.partition_id, node.node_id)
        for node in restarted:
            log(INFO, "%s node %d (partition %d) reconnected", where, node.node_id, node.partition_id)
        for node in result.added:
            applied = result.applied_rounds.get(node.node_id, 0)
            log(INFO, "%s partition %d joined (node %d, at round %d)", where, node.partition_id, node.node_id, applied)
        for node_id, partition in sorted(result.refused.items()):
            log(INFO, "%s node %d refused: partition %d is taken", where, node_id, partition)
        if left or restarted or result.added:
            log(INFO, "%s %d nodes, partitions %s", where, len(self.nodes), sorted(n.partition_id for n in self.nodes.values()))
