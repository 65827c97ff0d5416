"""The simulation's message dispatcher (simulations/fast_dispatch.py) hands out exactly what
Flower's per-node loop would, in one scan of the in-memory LinkState instead of one per node."""

from __future__ import annotations

import random
import threading
from queue import Queue

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

from server.inprocess_grid import ensure_task_identity
from simulations import fast_dispatch

ORIGINAL = fast_dispatch._ORIGINAL


def _state(seed: int):
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    ensure_task_identity()
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    nodes = _register_nodes(12, factory)
    state = factory.state()
    assert isinstance(state, InMemoryLinkState)
    state._check_stored_messages = lambda ids, run_id=None: None  # no run here: expiry is Flower's own code either way
    rng = random.Random(seed)
    ids = list(nodes)
    for i in range(40):  # several messages for some nodes, none for others, some already delivered
        msg = Message(RecordDict({"c": ConfigRecord({"i": i})}), dst_node_id=rng.choice(ids[:9]), message_type="train")
        if rng.random() < 0.2:
            msg.metadata.delivered_at = "earlier"
        state.message_ins_store[f"m{i:03d}"] = msg
    return state, nodes


def _ids(messages) -> list[int]:
    return [int(m.content["c"]["i"]) for m in messages]


def _flower_pass(state, nodes) -> list:
    """One pass of Flower's own loop body (vce_api.add_messages_to_queue)."""
    out = []
    for node_id in nodes.keys():
        out += state.get_message_ins(node_id=node_id, limit=1)
    return out


def test_each_pass_delivers_what_flowers_loop_delivers_in_the_same_order():
    flower_state, nodes = _state(seed=1)
    ours_state, nodes2 = _state(seed=1)
    order = {node: i for i, node in enumerate(nodes2)}
    passes = 0
    while expected := _flower_pass(flower_state, nodes):  # until everything is delivered
        passes += 1
        got = fast_dispatch.next_messages(ours_state, order)
        assert [nodes[m.metadata.dst_node_id] for m in expected] == [nodes2[m.metadata.dst_node_id] for m in got]
        assert _ids(expected) == _ids(got)
        assert all(m.metadata.delivered_at not in ("", "earlier") for m in got)
    assert fast_dispatch.next_messages(ours_state, order) == [] and passes > 2


def test_installed_in_the_engine_and_other_states_keep_flowers_loop():
    fast_dispatch.install()
    try:
        assert vce_api.add_messages_to_queue is fast_dispatch.add_messages_to_queue
        calls = []
        fast_dispatch._ORIGINAL = lambda *a: calls.append(a)
        fast_dispatch.add_messages_to_queue(object(), Queue(), {1: 0}, threading.Event())
        assert len(calls) == 1
    finally:
        fast_dispatch._ORIGINAL = ORIGINAL
        vce_api.add_messages_to_queue = ORIGINAL


def test_the_simulations_grid_pulls_replies_at_the_dispatch_interval():
    """Flower's in-memory grid sleeps `pull_interval` (0.1 s) between pulls of a stage's
    replies; the simulation's grid pulls at the dispatcher's interval instead."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    grid = InMemoryGrid.__new__(InMemoryGrid)  # no LinkState needed to read its setting
    grid.pull_interval = 0.1
    fast_dispatch.prompt(grid)
    assert grid.pull_interval == fast_dispatch.POLL_SECONDS < 0.1
    fast_dispatch.prompt(object())  # a deployment's grid has no such setting: left as it is
