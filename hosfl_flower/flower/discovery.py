"""Waiting for a federation's nodes and learning who they are (``query.hello``)."""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.serverapp import Grid

from ..options import ConfigError
from ..protocols.base import Link, NodeInfo
from ..protocols.messages import HelloRequest


def wait_for_nodes(grid: Grid, wanted: int, explicit: bool, timeout: float) -> list[int]:
    """The node ids once ``wanted`` nodes are connected. Without an explicit ``min-nodes``
    (``explicit=False``), a node count that stays below ``wanted`` for 15 s is a config error."""
    deadline = time.monotonic() + timeout
    last_count, stable_since = -1, time.monotonic()
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= wanted:
            return node_ids
        if len(node_ids) != last_count:
            last_count, stable_since = len(node_ids), time.monotonic()
        if not explicit and node_ids and time.monotonic() - stable_since > 15:
            raise ConfigError("clients-per-round", wanted, f"must be <= the number of nodes ({len(node_ids)})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of the {wanted} nodes needed connected within {timeout:.0f}s")
        time.sleep(0.2)


def hello(link: Link, node_ids: list[int], known: dict[int, NodeInfo], discovered: Callable[[NodeInfo, int], None]) -> None:
    """Ask every node not in ``known`` who it is; add it, and call ``discovered(node, applied_round)``."""
    new = [NodeInfo(nid, -1, 0) for nid in node_ids if nid not in known]
    for probe_node, reply in link.exchange([(node, HelloRequest()) for node in new]).items():
        node = NodeInfo(probe_node.node_id, reply.partition_id, reply.num_examples)
        clash = [n for n in known.values() if n.partition_id == node.partition_id]
        if clash:
            raise RuntimeError(f"nodes {clash[0].node_id} and {node.node_id} both hold partition {node.partition_id}")
        known[node.node_id] = node
        discovered(node, reply.applied_round)
