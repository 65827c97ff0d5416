"""Flower 1.41's simulation engine hands messages to virtual clients with a loop that, every
0.1 s, asks the in-memory LinkState for each registered node in turn whether a message waits
for it, and each ask scans every stored message (`vce_api.add_messages_to_queue`): nodes x
messages checks per pass. With 10,000 virtual clients and 100 sampled it kept one of this
machine's two cores busy in the driver, taking it from the clients' training (round training
time 1.5x the 1,000-client run's per example).

`install()` swaps in a dispatcher with the same contract, one scan per pass: expired and
invalid messages dropped exactly as before (the state's own check), at most one undelivered
message per node per pass, marked delivered, queued in the engine's node order. It is used
only where the state is the in-memory LinkState whose fields it reads; any other state keeps
Flower's loop.
"""

from __future__ import annotations

import threading
from queue import Queue

from flwr.server.superlink.fleet.vce import vce_api

_ORIGINAL = vce_api.add_messages_to_queue

POLL_SECONDS = 0.01
"""How long a message can wait before the engine hands it to a worker, and a reply before the
server sees it (the grid's `pull_interval`). Flower's 0.1 s on each side can cost every stage
of a round up to 0.2 s with the workers idle, and secure aggregation has five stages a round:
at 10 clients of 50 rows (rounds of ~6 s) that is up to a sixth of the round. A pass over a
store of a few hundred messages costs well under a millisecond."""


def _fits(state) -> bool:
    return all(hasattr(state, a) for a in ("message_ins_store", "lock", "_check_stored_messages"))


def next_messages(state, order: dict[int, int]) -> list:
    """One pass: for each node in `order` with an undelivered message, its first one."""
    from flwr.supercore.date import now

    with state.lock:
        ids = list(state.message_ins_store)
        state._check_stored_messages(set(ids))  # expiry and federation checks, as get_message_ins does
        chosen = {}
        for msg_id in ids:
            msg = state.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "":
                continue
            dst = msg.metadata.dst_node_id
            if dst in order and dst not in chosen:
                chosen[dst] = msg
        delivered_at = now().isoformat()
        for msg in chosen.values():
            msg.metadata.delivered_at = delivered_at
    return [chosen[n] for n in sorted(chosen, key=order.__getitem__)]


def add_messages_to_queue(state, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    if not _fits(state):
        return _ORIGINAL(state, queue, nodes_mapping, f_stop)
    order = {node: i for i, node in enumerate(nodes_mapping)}
    while not f_stop.is_set():
        for msg in next_messages(state, order):
            queue.put(msg)
        f_stop.wait(POLL_SECONDS)


def install() -> None:
    vce_api.add_messages_to_queue = add_messages_to_queue


def prompt(grid) -> None:
    """The simulation's in-memory grid pulls replies every `POLL_SECONDS`, not every 0.1 s."""
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = POLL_SECONDS
