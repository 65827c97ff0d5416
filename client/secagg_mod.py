"""Client side of secure aggregation, as a Flower mod: ``ClientApp(mods=[secagg_mod])``.

TRAIN messages carrying the ``secagg`` ConfigRecord are protocol steps; anything else goes
straight to ``call_next``. Only at the collect stage does the mod run the real training
(``call_next``); it replies with the masked ring vector and the training metrics, never the
trained arrays.

What the client enforces itself, whatever the server says (see ``shared/secagg/protocol.py``):
thresholds recomputed from n and k (raised by the owner's ``secagg-min-fraction`` node config,
never lowered); every neighbour's key advertisement signed by a key in the owner's local
roster (distinct owners, same round view); the survivor set signed by at least ``t_local`` of
its neighbourhood, connected in the graph and at least ``t`` large before any share leaves;
per owner either the self-mask share or the mask-key share, never both. Secrets live in
``context.state`` for the current round only: they are wiped after unmasking, when a stage
fails or arrives out of order, and replaced when a new round starts.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable

from shared.params import array_view
from shared.secagg import crypto, identity, masks, shamir
from shared.secagg.protocol import (
    MASKED_RECORD, ORDER, RECORD, STATE_RECORD, Key, Stage, ad_bytes, connected, get_record, harary_graph,
    nodes_digest, pack_blobs, pack_ids, resolve_k, ring_array, survivors_bytes, thresholds, unpack_blobs, unpack_ids,
)
from shared.secagg.quantize import Pieces, RingFormat
from shared.secagg.quantize import encode_clipped as encode

__all__ = ["MASKED_RECORD", "SECAGG_ACTIVE", "SecAggClientError", "secagg_mod"]

SECAGG_ACTIVE = "secagg-active"
"""context.state ConfigRecord present only while `_collect` runs training: the ClientApp's
owner policy reads the threshold it agreed to from here, not from the server's message."""


class SecAggClientError(RuntimeError):
    """The client refuses a protocol step; Flower turns this into an error reply."""


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    cfg = get_record(msg.content, RECORD, ConfigRecord) if msg.has_content() else None
    if msg.metadata.message_type != MessageType.TRAIN or cfg is None:
        return call_next(msg, context)
    node = int(context.node_id)
    try:
        if msg.metadata.dst_node_id != node:
            raise SecAggClientError(f"message for node {msg.metadata.dst_node_id} delivered to node {node}")
        stage = cfg.get(Key.STAGE)
        records: dict = {}
        if stage == Stage.ABORT:
            _wipe(context)
            return Message(RecordDict({RECORD: ConfigRecord({Key.STAGE: Stage.ABORT, Key.NODE_ID: node})}),
                           reply_to=msg)
        if stage == Stage.SETUP:
            state, out = _setup(cfg, node, context)
        else:
            state = _load_state(context, cfg)
            if stage == Stage.SHARE_KEYS:
                out = _share_keys(cfg, node, state, context)
            elif stage == Stage.COLLECT:
                out, records = _collect(msg, cfg, node, state, context, call_next)
            elif stage == Stage.CONSISTENCY:
                out = _consistency(cfg, node, state, context)
            else:
                out = _unmask(cfg, node, state, context)
        if stage == Stage.UNMASK:
            _wipe(context)
        else:
            _save_state(context, state)
    except Exception as exc:
        _wipe(context)  # an aborted round leaves no secret behind, whatever went wrong
        if isinstance(exc, (identity.IdentityError, KeyError, TypeError, ValueError, OverflowError)):
            raise SecAggClientError(f"{type(exc).__name__}: {exc}") from exc
        raise
    out[Key.STAGE] = str(stage)
    out[Key.NODE_ID] = node
    return Message(RecordDict({RECORD: ConfigRecord(out), **records}), reply_to=msg)


def _wipe(context: Context) -> None:
    if STATE_RECORD in context.state:
        del context.state[STATE_RECORD]


def _save_state(context: Context, state: dict) -> None:
    """The round's state as two values: the byte fields (secrets, keys, shares) concatenated
    raw in "blob", and a JSON "json" holding the other fields and each byte field's length
    (b: one bytes value, B: a list of them). A ConfigRecord key per field would cost
    Flower's per-item type checks on every stage, and hex in JSON cost twice the bytes and
    a third of the client's state time, for a record that never leaves this node."""
    plain, sizes, parts = {}, {}, []
    for k, v in state.items():
        if isinstance(v, bytes):
            sizes["b" + k] = len(v)
            parts.append(v)
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            sizes["B" + k] = [len(x) for x in v]
            parts.extend(v)
        else:
            plain[k] = v
    context.state[STATE_RECORD] = ConfigRecord({"json": json.dumps([plain, sizes]), "blob": b"".join(parts)})


def decode_state(record: ConfigRecord) -> dict:
    """The state `_save_state` stored, as the dict it was given."""
    (state, sizes), blob, pos = json.loads(record["json"]), record["blob"], 0
    for key, size in sizes.items():  # JSON keeps the order the fields were written in
        if key[0] == "b":
            state[key[1:]] = blob[pos: pos + size]
            pos += size
        else:
            state[key[1:]] = items = []
            for n in size:
                items.append(blob[pos: pos + n])
                pos += n
    return state


def _stored_state(context: Context) -> dict | None:
    rec = get_record(context.state, STATE_RECORD, ConfigRecord)
    return None if rec is None else decode_state(rec)


def _load_state(context: Context, cfg: ConfigRecord) -> dict:
    """Current-round state; rejects out-of-order, repeated or foreign-session steps."""
    state = _stored_state(context)
    if state is None:
        raise SecAggClientError("no secure-aggregation round in progress")
    if cfg.get(Key.SID) != state["sid"] or cfg.get(Key.ROUND) != state["round"]:
        raise SecAggClientError("message belongs to another secure-aggregation session")
    if ORDER.get(state["stage"]) != cfg.get(Key.STAGE):
        raise SecAggClientError(f"stage {cfg.get(Key.STAGE)!r} not allowed after {state['stage']!r}")
    state["stage"] = cfg[Key.STAGE]
    return state


def _ids(value, what: str) -> list[int]:
    try:
        return unpack_ids(value)
    except ValueError:
        raise SecAggClientError(f"malformed {what}") from None


def _blobs(value, what: str) -> list[bytes]:
    try:
        return unpack_blobs(value)
    except ValueError:
        raise SecAggClientError(f"malformed {what}") from None


def _min_fraction(context: Context) -> float:
    v = float(context.node_config.get("secagg-min-fraction", 0.0))
    if not 0.0 <= v <= 1.0:
        raise SecAggClientError("secagg-min-fraction must be in [0, 1]")
    return v


def _setup(cfg: ConfigRecord, node: int, context: Context) -> tuple[dict, dict]:
    _wipe(context)  # a new round replaces whatever an unfinished one left
    sid, rnd = cfg[Key.SID], cfg[Key.ROUND]
    if not isinstance(sid, bytes) or len(sid) < 16 or not isinstance(rnd, int):
        raise SecAggClientError("session id must be at least 16 random bytes")
    nodes = unpack_ids(cfg[Key.NODES])
    if nodes != sorted(set(nodes)) or node not in nodes or len(nodes) < 2:
        raise SecAggClientError("node list must be sorted, distinct, contain me and at least 2 nodes")
    n = len(nodes)
    k_req = cfg[Key.K]
    if not isinstance(k_req, int):
        raise SecAggClientError("malformed graph degree")
    k = resolve_k(n, k_req)
    if k != k_req:
        raise SecAggClientError(f"graph degree {k_req} is not valid for {n} nodes")
    t, t_local = thresholds(n, k, int(cfg.get(Key.T_REQ, 0)), _min_fraction(context))
    ident = identity.load_identity(context.node_config)
    graph = harary_graph(nodes, k, sid)
    c, s, b = crypto.generate_keypair(), crypto.generate_keypair(), os.urandom(32)
    commit = crypto.commit_seed(sid, node, b)
    digest = nodes_digest(nodes)
    sig = ident.sign(ad_bytes(sid, rnd, node, digest, k, t, t_local, c.public, s.public, commit))
    state = {
        "stage": Stage.SETUP, "sid": sid, "round": int(rnd), "n": n, "k": k, "t": t, "t-local": t_local,
        "digest": digest, "nodes": pack_ids(nodes), "neighbours": sorted(graph[node]),
        "c-sk": c.private, "s-sk": s.private, "b": b, "fp": ident.fingerprint,
    }
    return state, {Key.PK_C: c.public, Key.PK_S: s.public, Key.COMMIT: commit, Key.FP: ident.fingerprint,
                   Key.T: t, Key.T_LOCAL: t_local, Key.SIG: sig}


def _share_keys(cfg: ConfigRecord, node: int, state: dict, context: Context) -> dict:
    ids = _ids(cfg[Key.IDS], "advertisement list")
    cols = [_blobs(cfg[x], "advertisement list") for x in (Key.PK_C, Key.PK_S, Key.COMMIT, Key.FP, Key.SIG)]
    if any(len(c) != len(ids) for c in cols) or len(set(ids)) != len(ids):
        raise SecAggClientError("malformed advertisement list")
    if not set(ids) <= set(state["neighbours"]):
        raise SecAggClientError("server introduced keys of nodes that are not my neighbours")
    roster = identity.load_identity(context.node_config).roster
    ok_ids, pk_c, pk_s, fps, bad = [], [], [], [], []
    seen_fp = {state["fp"]}
    for j, pc, ps, cm, fp, sig in zip(ids, *cols):
        if not all(isinstance(x, bytes) for x in (pc, ps, cm, fp, sig)) or not (len(pc) == len(ps) == len(cm) == 32):
            bad.append(j)
            continue
        pub = roster.get(fp)
        if pub is None or fp in seen_fp:
            bad.append(j)
            continue  # not a registered owner, or an owner already present under another node id
        data = ad_bytes(state["sid"], state["round"], j, state["digest"], state["k"], state["t"], state["t-local"],
                        pc, ps, cm)
        if not identity.verify(pub, sig, data):
            bad.append(j)
            continue  # forged, or the signer saw another round (node list, degree, thresholds)
        seen_fp.add(fp)
        ok_ids.append(j)
        pk_c.append(pc)
        pk_s.append(ps)
        fps.append(fp)
    group = sorted([*state["neighbours"], node])
    if len(ok_ids) + 1 < state["t-local"]:
        raise SecAggClientError("too few authenticated neighbours to share my secrets")
    # share index = position in my full neighbourhood (stable, whoever is missing)
    b_shares, sk_shares = shamir.split_many([state["b"], state["s-sk"]], state["t-local"], len(group))
    # one agreement per neighbour; the derived share keys are kept for decrypting its shares
    keys = {j: crypto.share_key(sec, state["sid"], node, j)
            for j, sec in zip(ok_ids, crypto.agree_many(state["c-sk"], pk_c))}
    dsts, cts = [], []
    for pos, j in enumerate(group):
        if j == node:
            state["own-b-share"] = b_shares[pos]
            continue
        if j not in keys:
            continue
        key = keys[j]
        plaintext = struct.pack("<QQ", node, j) + b_shares[pos] + sk_shares[pos]
        dsts.append(j)
        cts.append(crypto.encrypt_share(key, plaintext, sid=state["sid"], rnd=state["round"], src=node, dst=j))
    state["ids"], state["pk-s"], state["fps"] = ok_ids, pk_s, fps
    state["share-keys"] = [keys[j] for j in ok_ids]
    del state["c-sk"]  # no longer needed
    return {Key.DST: pack_ids(dsts), Key.CT: pack_blobs(cts), Key.REJECTED: pack_ids(bad)}


def _receive_shares(cfg: ConfigRecord, node: int, state: dict) -> list[int]:
    """Decrypt relayed shares; returns the sources whose ciphertext was rejected."""
    key_of = dict(zip(state["ids"], state["share-keys"]))
    srcs, cts = _ids(cfg[Key.SRC], "share sources"), _blobs(cfg[Key.CT], "share list")
    if len(srcs) != len(cts):
        raise SecAggClientError("malformed share list")
    held_ids, held_b, held_sk, rejected = [], [], [], []
    for src, ct in zip(srcs, cts):
        if src not in key_of or src in held_ids or not isinstance(ct, bytes):
            rejected.append(src)
            continue
        key = key_of[src]
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
    del state["share-keys"]
    return rejected


def _delta_pieces(global_arrays: ArrayRecord, local: ArrayRecord):
    """local - global as float64, one tensor at a time through one reused buffer (each piece
    is consumed before the next is written), so encoding works on cache-sized pieces."""
    gs = [(key, array_view(garr)) for key, garr in global_arrays.items()]
    ls = []
    for key, g in gs:
        if key not in local:
            raise SecAggClientError(f"trained arrays lack {key!r}")
        l = array_view(local[key])
        if g.shape != l.shape:
            raise SecAggClientError(f"shape mismatch for {key!r}: {l.shape} vs {g.shape}")
        ls.append(l)
    buf = np.empty(max((g.size for _, g in gs), default=0), dtype=np.float64)

    def pieces():
        for (_, g), l in zip(gs, ls):
            piece = buf[: g.size]
            np.subtract(l.reshape(-1), g.reshape(-1), out=piece, dtype=np.float64)
            yield piece

    return pieces()


def _ring_format(cfg: ConfigRecord, n: int) -> RingFormat:
    bits, scale, w, clip = cfg[Key.BITS], cfg[Key.SCALE], cfg[Key.MAX_WEIGHT], cfg[Key.CLIP]
    if bits not in (32, 64) or not isinstance(w, int) or w < 1:
        raise SecAggClientError("malformed ring format")
    scale, clip = float(scale), float(clip)
    if not (math.isfinite(scale) and math.isfinite(clip) and scale > 0 and clip > 0):
        raise SecAggClientError("malformed ring format")
    if n * w * clip * scale > 2.0 ** (bits - 2) or n * w >= 2 ** (bits - 2):
        raise SecAggClientError("ring format leaves no headroom for the sum of n honest clients")
    return RingFormat(bits=int(bits), scale=scale, max_weight=int(w), clip=clip)


def _collect(msg: Message, cfg: ConfigRecord, node: int, state: dict, context: Context,
             call_next: ClientAppCallable) -> tuple[dict, dict]:
    rejected = _receive_shares(cfg, node, state)
    mask_nbrs = _ids(cfg[Key.MASK_NBRS], "mask neighbours")
    if not set(mask_nbrs) <= set(state["ids"]) or len(set(mask_nbrs)) != len(mask_nbrs):
        raise SecAggClientError("mask neighbours must be authenticated neighbours of mine")
    state["mask-nbrs"] = sorted(mask_nbrs)
    fmt = _ring_format(cfg, state["n"])
    global_arrays = get_record(msg.content, "arrays", ArrayRecord) or ArrayRecord()
    del msg.content[RECORD]
    context.state[SECAGG_ACTIVE] = ConfigRecord({
        "t-global": int(state["t"]), "t-local": int(state["t-local"]), "group-size": len(state["ids"]) + 1})
    try:
        reply = call_next(msg, context)
    finally:
        del context.state[SECAGG_ACTIVE]
    if reply.has_error():
        raise SecAggClientError(f"local training failed: {reply.error.reason}")
    metrics = get_record(reply.content, "metrics", MetricRecord) or MetricRecord()
    local = get_record(reply.content, "arrays", ArrayRecord) or ArrayRecord()
    weight = int(metrics.get("num-examples", 1))  # under DP no count leaves the client: each owner weighs 1
    declined = bool(metrics.get("declined", 0)) or len(local) == 0 or weight <= 0
    n_params = sum(int(np.prod(a.shape)) for a in global_arrays.values())
    # Honest clients never overflow: the update is clipped to the declared bound and the
    # weight capped, both of which the ring format leaves headroom for (n * W * C * scale).
    delta = Pieces((), n_params) if declined else Pieces(_delta_pieces(global_arrays, local), n_params)
    vec = encode(delta, 0 if declined else min(weight, fmt.max_weight), fmt)
    pk_s_of = dict(zip(state["ids"], state["pk-s"]))
    nbrs = state["mask-nbrs"]
    seeds = [(state["b"], +1)] + [
        (crypto.pair_mask_seed(sec, state["sid"], state["round"], node, j), +1 if node < j else -1)
        for j, sec in zip(nbrs, crypto.agree_many(state["s-sk"], [pk_s_of[j] for j in nbrs]))]
    masks.add_masks(vec, seeds, fmt.bits)
    del state["b"], state["s-sk"]  # from here on they live only in their shares
    if not declined:
        metrics["bytes-uploaded"] = int(vec.nbytes)  # what actually leaves: the masked ring vector
    masked = ArrayRecord({"masked": ring_array(vec)})
    return {Key.REJECTED: pack_ids(rejected)}, {"metrics": metrics, MASKED_RECORD: masked}


def _check_survivors(cfg: ConfigRecord, node: int, state: dict) -> list[int]:
    survivors = unpack_ids(cfg[Key.SURVIVORS])
    nodes = unpack_ids(state["nodes"])
    if survivors != sorted(set(survivors)) or node not in survivors or not set(survivors) <= set(nodes):
        raise SecAggClientError("malformed survivor list")
    if len(survivors) < state["t"]:
        raise SecAggClientError(f"{len(survivors)} survivors, below the threshold {state['t']}: refusing to unmask")
    graph = harary_graph(nodes, state["k"], state["sid"])
    if not connected(graph, set(survivors)):
        raise SecAggClientError("survivors are not connected in the mask graph: refusing to unmask")
    return survivors


def _consistency(cfg: ConfigRecord, node: int, state: dict, context: Context) -> dict:
    survivors = _check_survivors(cfg, node, state)
    state["survivors"] = pack_ids(survivors)
    ident = identity.load_identity(context.node_config)
    return {Key.SIG: ident.sign(survivors_bytes(state["sid"], state["round"], survivors))}


def _unmask(cfg: ConfigRecord, node: int, state: dict, context: Context) -> dict:
    if cfg.get(Key.SURVIVORS) != state["survivors"]:  # the set I checked and signed, byte for byte
        raise SecAggClientError("survivor set differs from the one I signed")
    survivors = unpack_ids(state["survivors"])
    ids, sigs = _ids(cfg[Key.IDS], "signer list"), _blobs(cfg[Key.SIG], "signature list")
    if len(ids) != len(sigs):
        raise SecAggClientError("malformed signature list")
    roster = identity.load_identity(context.node_config).roster
    pub_of = {j: roster[fp] for j, fp in zip(state["ids"], state["fps"])}
    data = survivors_bytes(state["sid"], state["round"], survivors)
    valid = {node}
    for j, sig in zip(ids, sigs):
        if len(valid) >= state["t-local"]:
            break  # enough of my neighbourhood vouches for this exact set
        if j in pub_of and j in survivors and j not in valid and identity.verify(pub_of[j], sig, data):
            valid.add(j)
    if len(valid) < state["t-local"]:
        raise SecAggClientError(f"only {len(valid)} of my neighbourhood signed this survivor set, "
                                f"need {state['t-local']}: refusing to unmask")
    alive = set(survivors)
    b_of = dict(zip(state["held-ids"], state["held-b"]))
    sk_of = dict(zip(state["held-ids"], state["held-sk"]))
    out_ids, kinds, shares = [node], [0], [state["own-b-share"]]
    for j in sorted(b_of):
        if j in alive:
            out_ids.append(j), kinds.append(0), shares.append(b_of[j])  # self-mask share: j's input is in the sum
        elif j in state["mask-nbrs"]:
            out_ids.append(j), kinds.append(1), shares.append(sk_of[j])  # mask-key share: j dropped after sharing
    return {Key.IDS: pack_ids(out_ids), Key.KIND: bytes(kinds), Key.SHARES: pack_blobs(shares)}
