"""Node discovery from round to round, over the real GridLink and a grid whose nodes are scripted: nodes
that leave are dropped, nodes that join or restart are asked ``query.hello`` (and only they), a claim on
a partition a connected node holds is refused and counted, bad hello replies are counted, nothing raises,
and a restarted node is handed to the protocol, which catches it up from the round it reports."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hosfl_flower.config import resolve_run_config
from hosfl_flower.flower.discovery import NodeDirectory, connected_nodes, hello
from hosfl_flower.flower.link import GridLink
from hosfl_flower.flower.strategy import HOSFLStrategy
from hosfl_flower.protocols import NodeInfo
from hosfl_flower.protocols.messages import HelloReply
from hosfl_flower.task import server_model_and_test
from hosfl_flower.zo import LedgerEntry


@pytest.fixture(autouse=True)
def task_identity():
    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


class ScriptedGrid:
    """Connected nodes ``node id -> (activation time, answer)``; an answer is a :class:`HelloReply`, a
    content ``RecordDict`` (malformed), ``"error"`` or ``None`` (no reply)."""

    def __init__(self) -> None:
        self.nodes: dict[int, tuple[str, object]] = {}
        self.sent: list[list[int]] = []

    def get_node_ids(self):
        return list(self.nodes)

    def get_nodes(self):
        return [SimpleNamespace(node_id=nid, last_activated_at=at) for nid, (at, _) in self.nodes.items()]

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent.append([m.metadata.dst_node_id for m in messages])
        replies = []
        for message in messages:
            answer = self.nodes.get(message.metadata.dst_node_id, ("", None))[1]
            if answer is None:
                continue
            if answer == "error":
                replies.append(Message(Error(code=5, reason="node unavailable"), reply_to=message))
            else:
                content = answer.to_record() if isinstance(answer, HelloReply) else answer
                replies.append(Message(content, reply_to=message))
        return replies


def _link(grid: ScriptedGrid) -> GridLink:
    return GridLink("test", grid, 1, None, 5.0)


def _update(directory: NodeDirectory, grid: ScriptedGrid, found: list, when: str = "round 1") -> GridLink:
    link = _link(grid)
    directory.update(link, connected_nodes(grid), lambda node, applied: found.append((node, applied)), when)
    return link


def test_the_node_list_follows_the_grid_and_asks_only_new_or_reconnected_nodes():
    grid, directory, found = ScriptedGrid(), NodeDirectory(name="test"), []
    grid.nodes = {10 + p: ("t0", HelloReply(p, 3, 20 + p, 0)) for p in range(3)}
    _update(directory, grid, found, "")
    assert {nid: n.partition_id for nid, n in directory.nodes.items()} == {10: 0, 11: 1, 12: 2}
    assert grid.sent == [[10, 11, 12]] and [applied for _, applied in found] == [0, 0, 0]

    link = _update(directory, grid, found)  # nothing changed: no message at all
    assert len(grid.sent) == 1 and link.account.round_trips == 0 and not link.rejections

    # node 11 restarts with the same identity (node authentication keeps its id): Flower activated it again
    grid.nodes[11] = ("t1", HelloReply(1, 3, 21, 0))
    _update(directory, grid, found)
    assert grid.sent[-1] == [11] and found[-1] == (NodeInfo(11, 1, 21), 0)

    # node 12 restarts without authentication: a new id for partition 2, the old one gone
    del grid.nodes[12]
    grid.nodes[13] = ("t2", HelloReply(2, 3, 22, 4))
    link = _update(directory, grid, found)
    assert grid.sent[-1] == [13] and found[-1] == (NodeInfo(13, 2, 22), 4)
    assert {nid: n.partition_id for nid, n in directory.nodes.items()} == {10: 0, 11: 1, 13: 2}
    assert not link.rejections

    del grid.nodes[10]  # a node that leaves is dropped; no message is sent for it
    _update(directory, grid, found)
    assert sorted(directory.nodes) == [11, 13] and len(grid.sent) == 3


def test_a_claim_on_a_connected_nodes_partition_is_refused_and_counted_until_the_holder_leaves():
    grid, directory, found = ScriptedGrid(), NodeDirectory(), []
    grid.nodes = {1: ("t", HelloReply(0, 2, 10, 0)), 2: ("t", HelloReply(1, 2, 10, 0))}
    _update(directory, grid, found, "")

    grid.nodes[3] = ("t", HelloReply(0, 2, 10, 0))  # claims partition 0, held by the connected node 1
    link = _update(directory, grid, found)
    assert link.rejections == {"partition-taken": 1}
    assert directory.nodes[1].partition_id == 0 and 3 not in directory.nodes and len(found) == 2

    link = _update(directory, grid, found)  # not asked again while nothing changes
    assert grid.sent[-1] == [3] and len(grid.sent) == 2 and not link.rejections

    del grid.nodes[1]  # the holder leaves: the refused node is asked again and takes the partition
    _update(directory, grid, found)
    assert grid.sent[-1] == [3] and directory.nodes[3] == NodeInfo(3, 0, 10) and found[-1][0].node_id == 3


def test_two_new_nodes_claiming_one_partition_the_first_wins():
    grid, found = ScriptedGrid(), []
    grid.nodes = {5: ("", HelloReply(0, 1, 10, 0)), 4: ("", HelloReply(0, 1, 10, 0))}
    known: dict[int, NodeInfo] = {}
    link = _link(grid)
    result = hello(link, [5, 4], known, lambda node, applied: found.append(node))
    assert list(known) == [4] and result.refused == {5: 0} and link.rejections == {"partition-taken": 1}


def test_a_gone_holder_is_replaced_and_invalid_hello_replies_never_raise():
    grid, found = ScriptedGrid(), []
    known = {1: NodeInfo(1, 0, 10)}
    grid.nodes = {
        2: ("", HelloReply(0, 2, 10, 3)),  # takes partition 0 from node 1, which is not connected
        3: ("", RecordDict({"node": ConfigRecord({"partition-id": 1})})),  # malformed
        4: ("", RecordDict({"node": ConfigRecord({"partition-id": 7, "num-partitions": 2, "num-examples": 5})})),
        5: ("", "error"),
        6: ("", None),  # no reply
    }
    link = _link(grid)
    result = hello(link, [2, 3, 4, 5, 6], known, lambda node, applied: found.append((node, applied)), connected=[2, 3, 4, 5, 6])
    assert known == {2: NodeInfo(2, 0, 10)} and found == [(NodeInfo(2, 0, 10), 3)]
    assert result.replaced == [NodeInfo(1, 0, 10)] and result.added == [NodeInfo(2, 0, 10)]
    assert link.rejections == {"malformed": 1, "out-of-range": 1, "error": 1, "no-reply": 1}

    directory = NodeDirectory(known)
    grid.nodes[6] = ("", HelloReply(1, 2, 10, 0))  # a node that did not answer is asked again next round
    link = _update(directory, grid, found)
    assert grid.sent[-1] == [3, 4, 5, 6] and 6 in directory.nodes
    assert link.rejections == {"malformed": 1, "out-of-range": 1, "error": 1}


def test_a_restarted_node_is_caught_up_by_the_ledger_protocol_and_sampling_stays_by_partition():
    """The strategy's per-round refresh hands a restarted node to HO-SFL, which starts it from the round
    it reports (0: its state was lost), so its next request carries the whole ledger (or the weights)."""
    config = resolve_run_config({"results-dir": "", "clients-per-round": 2, "seed": 1})
    model, test = server_model_and_test(config)
    strategy = HOSFLStrategy(model, test, config)
    grid = ScriptedGrid()
    grid.nodes = {100 + p: ("t0", HelloReply(p, 3, 30, 0)) for p in range(3)}
    strategy.directory.update(_link(grid), connected_nodes(grid), strategy.protocol.node_discovered)
    sync = strategy.protocol.sync
    for r in (1, 2):
        sync.ledger.append(LedgerEntry(r, (r,), (0.0,), 0.0, 1e-3))
    sync.node_applied.update({nid: 2 for nid in strategy.nodes})
    picked = [n.partition_id for n in strategy.sample_nodes(3, list(strategy.nodes.values()))]

    grid.nodes[101] = ("t1", HelloReply(1, 3, 30, 0))  # partition 1 restarted, with nothing applied
    strategy.refresh_nodes(grid, _link(grid), 3)
    assert sync.node_applied[101] == 0 and sync.node_applied[100] == 2
    catch_up = sync.catch_up(strategy.nodes[101])
    assert catch_up.replacement is not None or [e.round for e in catch_up.entries] == [1, 2]

    other = HOSFLStrategy(model, test, config)  # other node ids, the same partitions: the same draw
    grid.nodes = {200 + p: ("t0", HelloReply(p, 3, 30, 0)) for p in (2, 0, 1)}
    other.directory.update(_link(grid), connected_nodes(grid), other.protocol.node_discovered)
    assert [n.partition_id for n in other.sample_nodes(3, list(other.nodes.values()))] == picked


def test_a_node_cannot_claim_another_federation_or_more_examples_than_its_partition_has():
    from hosfl_flower.flower.discovery import Federation

    grid, found = ScriptedGrid(), []
    directory = NodeDirectory(name="test", federation=Federation(lambda n: [20 + p for p in range(n)]))
    grid.nodes = {10 + p: ("t0", HelloReply(p, 3, 20 + p, 0)) for p in range(3)}
    grid.nodes[13] = ("t0", HelloReply(0, 1, 10**6, 0))  # a node of a one-partition "federation" with all the data
    link = _update(directory, grid, found, "")
    assert directory.federation.num_partitions == 3  # the claim most nodes make
    assert sorted(directory.nodes) == [10, 11, 12] and dict(link.rejections) == {"wrong-federation": 1}

    grid.nodes[12] = ("t1", HelloReply(2, 3, 20_000, 0))  # restarts claiming a thousand times its examples
    link = _update(directory, grid, found)
    assert 12 not in directory.nodes and dict(link.rejections) == {"wrong-count": 1}
    assert grid.sent[-1] == [12]  # the node of the other federation is not asked again until it reconnects
    grid.nodes[12] = ("t2", HelloReply(2, 3, 22, 0))
    _update(directory, grid, found)
    assert directory.nodes[12].num_examples == 22


def test_the_strategy_holds_nodes_to_the_partition_sizes_it_computes():
    from hosfl_flower.app import build_strategy
    from hosfl_flower.task import client_task

    strategy = build_strategy({"num-server-rounds": 1})
    sizes = strategy.federation.partition_sizes(4)
    assert sizes == [len(client_task(strategy.cfg, 4).data.partition(p)) for p in range(4)]
