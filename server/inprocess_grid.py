"""A Flower Grid that runs ClientApps in this process, for driving the real server workflow.

`InProcessGrid.send_and_receive` hands each message to the destination node's client mod
(`client.secagg_mod` by default) with that node's own Context, as a SuperNode would, so the
secure-aggregation benchmark (`simulations.bench_secagg`) and the protocol, security and
privacy tests run the real server code against the real client code without a SuperLink,
Ray or sockets. It lives in the package, not under simulations/ or tests/, because both
of those import it; no run uses it.
"""

from __future__ import annotations

import copy
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.secagg_mod import secagg_mod
from shared.secagg.identity import make_simulation_keys
from shared.secagg.protocol import RECORD, get_record


def ensure_task_identity() -> None:
    """Message() needs the ServerApp's identity; outside a real run we play the SuperLink (node 1)."""
    for attr, val in (("run_id", 1), ("node_id", 1), ("task_id", 1)):
        try:
            getattr(TaskIdentity, attr)
        except RuntimeError:
            setattr(TaskIdentity, attr, val)


TrainFn = Callable[[Message, Context], Message]


_KEYS: dict[tuple[int, ...], tuple[Path, Path]] = {}


def _owner_keys(nodes: tuple[int, ...]) -> tuple[Path, Path]:
    """(key folder, roster) for these nodes, made once per process: owners' signing keys are
    long-lived, so every round after the first finds them in the identity cache, as in a run."""
    if nodes not in _KEYS:
        key_dir = Path(tempfile.mkdtemp(prefix="fedlora-secagg-keys-"))
        _KEYS[nodes] = key_dir, make_simulation_keys(key_dir, [f"node-{nid}" for nid in nodes])
    return _KEYS[nodes]


class InProcessGrid(Grid):
    """Delivers each message to its node's ``mod(msg, context, train)`` and returns the replies.

    ``drop(stage, node) -> bool`` makes a node silently miss a stage; ``on_deliver`` and
    ``on_reply`` can rewrite messages in flight (tamper/replay/impersonation tests);
    ``replies`` records everything the server received.
    """

    def __init__(self, trains: dict[int, TrainFn], mod=secagg_mod):
        ensure_task_identity()
        self.trains = trains
        self.mod = mod
        self.key_dir, roster = _owner_keys(tuple(trains))
        self.contexts = {nid: Context(1, nid, {"secagg-key": str(self.key_dir / f"node-{nid}"),
                                               "secagg-roster": str(roster)}, RecordDict(), {}) for nid in trains}
        self.roster_dir = roster
        self.drop: Callable[[str | None, int], bool] = lambda stage, nid: False
        self.dead: set[int] = set()
        """Nodes the SuperLink reports unavailable (an error reply from the SuperLink, node 1)."""
        self.on_deliver: Callable[[Message], Message] = lambda m: m
        self.on_reply: Callable[[Message], Message] = lambda m: m
        self.replies: list[Message] = []
        self.client_seconds = 0.0

    def set_run(self, run) -> None:  # noqa: D102
        pass

    @property
    def run(self):  # noqa: D102
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.trains)

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            nid = msg.metadata.dst_node_id
            rec = get_record(msg.content, RECORD, ConfigRecord) if msg.has_content() else None
            stage = rec.get("stage") if rec is not None else None
            if nid in self.dead:
                err = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable"), reply_to=msg)
                err.metadata.__dict__["_src_node_id"] = 1
                out.append(err)
                continue
            if nid not in self.trains or self.drop(stage, nid):
                continue
            # A private copy, as after real serialisation: flwr's mod mutates records in place.
            delivered = self.on_deliver(Message(content=copy.deepcopy(msg.content), metadata=msg.metadata))
            t0 = time.perf_counter()
            try:
                reply = self.mod(delivered, self.contexts[nid], self.trains[nid])
            except Exception as exc:  # Flower turns a ClientApp exception into an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.client_seconds += time.perf_counter() - t0
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply = self.on_reply(reply)
            self.replies.append(reply)
            out.append(reply)
        return out


def make_train(delta: dict[str, np.ndarray] | None, num_examples: int, *, declined: bool = False) -> TrainFn:
    """A ClientApp train stub replying with global + ``delta`` and the contract's metrics."""

    def train(msg: Message, context: Context) -> Message:
        metrics = {"num-examples": 0 if declined else num_examples, "epsilon": 1.0, "delta": 1e-5,
                   "declined": int(declined), "train-loss": 0.5, "partition-id": context.node_id,
                   "update-bound": float("inf")}
        if declined:
            arrays = ArrayRecord()
        else:
            g = msg.content.array_records["arrays"]
            arrays = ArrayRecord({k: Array((a.numpy() + delta[k]).astype(np.float32)) for k, a in g.items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    return train


def train_messages(nodes: list[int], global_arrays: ArrayRecord, server_round: int = 1) -> list[Message]:
    """One TRAIN message per node carrying the global arrays and the round, as the strategy sends."""
    ensure_task_identity()
    return [
        Message(RecordDict({"arrays": global_arrays, "config": ConfigRecord({"server-round": server_round})}),
                dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(server_round))
        for nid in nodes
    ]
