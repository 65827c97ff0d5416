"""Client side of secure aggregation, as a Flower mod: ``ClientApp(mods=[secagg_mod])``.

TRAIN messages carrying the ``secagg`` ConfigRecord are protocol steps; anything else goes
straight to ``call_next``. Only at the collect stage does the mod run the real training
(``call_next``), and it replies with the masked ring vector and the plaintext metrics, never
the trained arrays. Secrets live in ``context.state`` (the per-node store that survives
ClientApp rebuilds in simulation) for the current round only and are wiped after unmasking.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable

from shared.secagg import crypto, masks, shamir
from shared.secagg.protocol import RECORD, STATE_RECORD, Key, Stage
from shared.secagg.quantize import QuantizationOverflow, RingFormat, encode

SECAGG_ACTIVE = "secagg-active"
"""context.state ConfigRecord present only while `_collect` runs training: the ClientApp's
owner policy reads the threshold it agreed to from here, not from the server's message."""

MASKED_RECORD = "secagg-masked"
"""ArrayRecord name of the masked vector (an ArrayRecord so Flower can chunk large payloads)."""


class SecAggClientError(RuntimeError):
    """The client refuses a protocol step; Flower turns this into an error reply."""


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or not msg.has_content()
        or RECORD not in msg.content.config_records
    ):
        return call_next(msg, context)
    cfg = msg.content.config_records[RECORD]
    node = int(context.node_id)
    if msg.metadata.dst_node_id != node:
        raise SecAggClientError(f"message for node {msg.metadata.dst_node_id} delivered to node {node}")
    stage = cfg.get(Key.STAGE)
    if stage == Stage.SETUP:
        out, records = _setup(cfg, node, context), {}
    else:
        state = _load_state(context, cfg)
        if stage == Stage.SHARE_KEYS:
            out, records = _share_keys(cfg, node, state), {}
        elif stage == Stage.COLLECT:
            out, records = _collect(msg, cfg, node, state, context, call_next)
        elif stage == Stage.UNMASK:
            out, records = _unmask(cfg, node, state), {}
        else:
            raise SecAggClientError(f"unknown secure-aggregation stage {stage!r}")
        if stage == Stage.UNMASK:
            del context.state.config_records[STATE_RECORD]
        else:
            context.state.config_records[STATE_RECORD] = ConfigRecord(state)
    out[Key.STAGE] = str(stage)
    out[Key.NODE_ID] = node
    content = RecordDict({RECORD: ConfigRecord(out), **records})
    return Message(content, reply_to=msg)


_ORDER = {Stage.SETUP: Stage.SHARE_KEYS, Stage.SHARE_KEYS: Stage.COLLECT, Stage.COLLECT: Stage.UNMASK}


def _load_state(context: Context, cfg: ConfigRecord) -> dict:
    """Current-round state; rejects out-of-order, repeated or foreign-session steps."""
    if STATE_RECORD not in context.state.config_records:
        raise SecAggClientError("no secure-aggregation round in progress")
    state = dict(context.state.config_records[STATE_RECORD])
    if cfg.get(Key.SID) != state["sid"] or cfg.get(Key.ROUND) != state["round"]:
        raise SecAggClientError("message belongs to another secure-aggregation session")
    if _ORDER.get(state["stage"]) != cfg.get(Key.STAGE):
        raise SecAggClientError(f"stage {cfg.get(Key.STAGE)!r} not allowed after {state['stage']!r}")
    state["stage"] = cfg[Key.STAGE]
    return state


def _setup(cfg: ConfigRecord, node: int, context: Context) -> dict:
    sid, rnd = cfg[Key.SID], cfg[Key.ROUND]
    neighbours = [int(j) for j in cfg[Key.NEIGHBOURS]]
    t_local, t_global = int(cfg[Key.LOCAL_THRESHOLD]), int(cfg[Key.GLOBAL_THRESHOLD])
    if not isinstance(sid, bytes) or len(sid) < 16:
        raise SecAggClientError("session id must be at least 16 random bytes")
    if node in neighbours or len(set(neighbours)) != len(neighbours) or not 2 <= t_local <= len(neighbours) + 1:
        raise SecAggClientError("malformed neighbour list or threshold")
    c, s, b = crypto.generate_keypair(), crypto.generate_keypair(), os.urandom(32)
    context.state.config_records[STATE_RECORD] = ConfigRecord({
        "stage": Stage.SETUP, "sid": sid, "round": int(rnd), "neighbours": neighbours,
        "t-local": t_local, "t-global": t_global, "c-sk": c.private, "s-sk": s.private, "b": b,
    })
    return {Key.PK_C: c.public, Key.PK_S: s.public, "commit-b": crypto.commit_seed(sid, node, b)}


def _share_keys(cfg: ConfigRecord, node: int, state: dict) -> dict:
    ids = [int(j) for j in cfg[Key.IDS]]
    pk_c, pk_s = list(cfg[Key.PK_C]), list(cfg[Key.PK_S])
    if len(ids) != len(pk_c) or len(ids) != len(pk_s) or len(set(ids)) != len(ids):
        raise SecAggClientError("malformed public-key list")
    if not set(ids) <= set(state["neighbours"]):
        raise SecAggClientError("server introduced keys of nodes that are not my neighbours")
    group = sorted([*ids, node])
    if len(group) < state["t-local"]:
        raise SecAggClientError("too few neighbours left to share my secrets")
    b_shares = shamir.split(state["b"], state["t-local"], len(group))
    sk_shares = shamir.split(state["s-sk"], state["t-local"], len(group))
    pk_c_of = dict(zip(ids, pk_c))
    dsts, cts = [], []
    for pos, j in enumerate(group):
        if j == node:
            state["own-b-share"], state["own-sk-share"] = b_shares[pos], sk_shares[pos]
            continue
        key = crypto.share_key(crypto.agree(state["c-sk"], pk_c_of[j]), state["sid"], node, j)
        plaintext = struct.pack("<QQ", node, j) + b_shares[pos] + sk_shares[pos]
        dsts.append(j)
        cts.append(crypto.encrypt_share(key, plaintext, sid=state["sid"], rnd=state["round"], src=node, dst=j))
    state["ids"], state["pk-c"], state["pk-s"] = ids, pk_c, pk_s
    return {Key.DST: dsts, Key.CT: cts}


def _receive_shares(cfg: ConfigRecord, node: int, state: dict) -> list[int]:
    """Decrypt relayed shares; returns the sources whose ciphertext was rejected."""
    pk_c_of = dict(zip(state["ids"], state["pk-c"]))
    held_ids, held_b, held_sk, rejected = [], [], [], []
    for src, ct in zip(cfg[Key.SRC], cfg[Key.CT], strict=True):
        src = int(src)
        if src not in pk_c_of or src in held_ids:
            rejected.append(src)
            continue
        key = crypto.share_key(crypto.agree(state["c-sk"], pk_c_of[src]), state["sid"], node, src)
        try:
            pt = crypto.decrypt_share(key, ct, sid=state["sid"], rnd=state["round"], src=src, dst=node)
        except crypto.ShareDecryptionError:
            rejected.append(src)
            continue
        if len(pt) != 16 + 2 * shamir.SHARE_LEN or struct.unpack("<QQ", pt[:16]) != (src, node):
            rejected.append(src)
            continue
        held_ids.append(src)
        held_b.append(pt[16 : 16 + shamir.SHARE_LEN])
        held_sk.append(pt[16 + shamir.SHARE_LEN :])
    state["held-ids"], state["held-b"], state["held-sk"] = held_ids, held_b, held_sk
    return rejected


def _flat_delta(global_arrays: ArrayRecord, local: ArrayRecord) -> np.ndarray:
    parts = []
    for key, garr in global_arrays.items():
        if key not in local:
            raise SecAggClientError(f"trained arrays lack {key!r}")
        g, l = garr.numpy(), local[key].numpy()
        if g.shape != l.shape:
            raise SecAggClientError(f"shape mismatch for {key!r}: {l.shape} vs {g.shape}")
        parts.append(l.astype(np.float64).reshape(-1) - g.astype(np.float64).reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0)


def _collect(msg: Message, cfg: ConfigRecord, node: int, state: dict, context: Context,
             call_next: ClientAppCallable) -> tuple[dict, dict]:
    rejected = _receive_shares(cfg, node, state)
    mask_nbrs = [int(j) for j in cfg[Key.NEIGHBOURS]]
    if not set(mask_nbrs) <= set(state["ids"]):
        raise SecAggClientError("mask neighbours must be a subset of my key-exchange neighbours")
    state["mask-nbrs"] = mask_nbrs
    fmt = RingFormat(bits=int(cfg[Key.BITS]), scale=float(cfg[Key.SCALE]),
                     max_weight=int(cfg[Key.MAX_WEIGHT]), clip=float(cfg[Key.CLIP]))
    global_arrays = msg.content.array_records.get("arrays", ArrayRecord())
    del msg.content[RECORD]
    context.state.config_records[SECAGG_ACTIVE] = ConfigRecord({
        "t-global": int(state["t-global"]), "t-local": int(state["t-local"]), "group-size": len(state["ids"]) + 1})
    try:
        reply = call_next(msg, context)
    finally:
        del context.state.config_records[SECAGG_ACTIVE]
    if reply.has_error():
        raise SecAggClientError(f"local training failed: {reply.error.reason}")
    metrics = reply.content.metric_records.get("metrics", MetricRecord())
    local = reply.content.array_records.get("arrays", ArrayRecord())
    weight = int(metrics.get("num-examples", 1))  # under DP no count leaves the client: each owner weighs 1
    declined = bool(metrics.get("declined", 0)) or len(local) == 0 or weight == 0
    out: dict = {Key.REJECTED: rejected}
    n_params = sum(int(np.prod(a.shape)) for a in global_arrays.values())
    try:
        delta = np.zeros(n_params) if declined else _flat_delta(global_arrays, local)
        vec = encode(delta, 0 if declined else weight, fmt)
    except QuantizationOverflow as exc:
        out |= {Key.OVERFLOW: 1, Key.OVERFLOW_REASON: str(exc)}
        return out, {"metrics": metrics}
    masks.add_mask(vec, state["b"], fmt.bits, +1)
    pk_s_of = dict(zip(state["ids"], state["pk-s"]))
    for j in mask_nbrs:
        seed = crypto.pair_mask_seed(crypto.agree(state["s-sk"], pk_s_of[j]), state["sid"], state["round"], node, j)
        masks.add_mask(vec, seed, fmt.bits, +1 if node < j else -1)
    out[Key.OVERFLOW] = 0
    if not declined:
        metrics["bytes-uploaded"] = int(vec.nbytes)  # what actually leaves: the masked ring vector
    return out, {"metrics": metrics, MASKED_RECORD: ArrayRecord({"masked": Array(vec)})}


def _unmask(cfg: ConfigRecord, node: int, state: dict) -> dict:
    survivors = [int(j) for j in cfg[Key.SURVIVORS]]
    dropped = [int(j) for j in cfg[Key.DROPPED]]
    group = set(state["ids"]) | {node}
    if set(survivors) & set(dropped):
        raise SecAggClientError("a node cannot be both alive and dropped")
    if node not in survivors or not set(survivors) | set(dropped) <= group:
        raise SecAggClientError("survivor/dropped lists inconsistent with my neighbourhood")
    if not set(dropped) <= set(state["mask-nbrs"]):
        raise SecAggClientError("only nodes that completed key sharing can be reported dropped")
    if int(cfg[Key.N_SURVIVORS]) < state["t-global"]:
        raise SecAggClientError("fewer survivors than the threshold: refusing to unmask")
    b_of = dict(zip(state["held-ids"], state["held-b"]))
    sk_of = dict(zip(state["held-ids"], state["held-sk"]))
    b_of[node] = state["own-b-share"]
    ids, shares = [], []
    for j in survivors:
        if j in b_of:
            ids.append(j)
            shares.append(b_of[j])
    n_alive = len(ids)
    for j in dropped:
        if j in sk_of:
            ids.append(j)
            shares.append(sk_of[j])
    return {Key.IDS: ids, Key.SHARES: shares, "n-alive": n_alive}
