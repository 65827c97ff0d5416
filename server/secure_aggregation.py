"""Server side of secure aggregation (SecAgg+, Bell et al. 2020, hardened against a malicious server).

Five round trips over ``grid.send_and_receive`` (see ``shared/secagg/protocol.py`` for the
parameters and ``client/secagg_mod.py`` for what each client checks):

1. setup: each sampled node gets the sorted node list, the graph degree k and the session id;
   it answers with two X25519 public keys, a commitment to its self-mask seed and its
   thresholds, all signed with its registered owner key.
2. share-keys: each node gets its Harary-graph neighbours' signed advertisements, verifies
   them against its local roster, and returns Shamir shares of its self-mask seed and mask
   key, AES-GCM encrypted for each neighbour; the server only relays ciphertexts.
3. collect-masked: the original TRAIN content plus the relayed shares; each node trains,
   encodes ``[w * delta, w]`` in Z_{2^b} and adds its self mask and pairwise masks.
4. consistency: the survivors (nodes whose masked vector arrived) sign that exact set.
5. unmask: each survivor checks the signatures of its neighbourhood on the same set, then
   reveals per neighbour the self-mask share (alive) or the mask-key share (dropped).

The server strips the masks from the *sum* only, checks the sum is within what the sampled
clients could honestly produce, and hands the weighted mean to the wrapped strategy.

A client that sends anything malformed, oversized, duplicated or inconsistent is dropped
from the round with one log line and the round goes on (:class:`_Bad`); a round that cannot
complete (fewer than t survivors, an out-of-range sum) is discarded and the model kept.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shared.params import array_view
from shared.secagg import crypto, identity, masks, shamir
from shared.secagg.protocol import (
    MASKED_RECORD, MAX_NODES, RECORD, Key, Stage, ad_bytes, get_record, harary_graph, nodes_digest, pack_blobs,
    pack_ids, resolve_k, ring_vector, thresholds, unpack_blobs, unpack_ids,
)
from shared.secagg.quantize import DEFAULT_CLIP, QuantizationOverflow, RingFormat, choose_format, decode_sum, to_signed

log = logging.getLogger("flwr")

POLL_FIRST, POLL_MAX = 0.05, 0.25
"""Seconds between pulls for a stage's replies: short at first, then backing off."""


def send_and_receive(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """`grid.send_and_receive` with a backed-off poll. Flower's deployed grid pulls every 3 s,
    and a round has five stages whose replies mostly arrive within a second: up to 15 s a
    round of waiting for nothing. Grids that cannot push and pull apart keep their own."""
    try:
        ids = set(grid.push_messages(messages))
    except NotImplementedError:
        return list(grid.send_and_receive(messages, timeout=timeout))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    wait = POLL_FIRST
    while ids:
        got = list(grid.pull_messages(ids))
        replies += got
        ids -= {m.metadata.reply_to_message_id for m in got}
        if not ids or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
        wait = min(POLL_MAX, wait * 1.5)
    return replies

DEFAULT_MAX_WEIGHT = 1 << 14
"""Default cap on a client's weight (its example count is clipped to it)."""

__all__ = ["MASKED_RECORD", "RingAccumulator", "RoundFailed", "SecAggConfig", "SecAggResult", "SecureAggregation",
           "secure_aggregate"]


@dataclass
class SecAggConfig:
    """Protocol parameters.

    ``threshold``: raises the minimum number of survivors (fraction <= 1 of the sampled clients
    or a count); it can never go below the client-enforced minimum (majority of n and n - f).
    ``neighbours``: graph degree k (default: complete up to 12 clients, else 2 ceil(log2 n)).
    ``timeout``: seconds each stage waits for replies. ``update_bound``: declared bound C on
    each client's |delta|_inf (clients clip to it). ``max_weight``: cap W on a client's
    weight; ``equal_weights`` sets W = 1 (every trained client counts once).
    """

    threshold: float | int | None = None
    neighbours: int | None = None
    bits: int | None = None
    timeout: float = 300.0
    update_bound: float | None = None
    max_weight: int | None = None
    equal_weights: bool = False
    roster: Mapping | None = None
    """Registered owner keys (fingerprint -> public key), when the server has them too: it then
    checks advertisements itself, so a client falsely accusing a peer drops only itself.
    Default: the simulation roster when one is set up, else None (clients' word decides)."""

    def __post_init__(self) -> None:
        if self.roster is None and os.environ.get(identity.ENV_SIM_DIR):
            try:
                self.roster = identity.cached_roster(Path(os.environ[identity.ENV_SIM_DIR]) / "roster")
            except identity.IdentityError:
                self.roster = None


@dataclass
class SecAggResult:
    arrays: ArrayRecord | None
    metrics: list[MetricRecord]
    dropped: list[int]
    """Sampled nodes whose update is not in the aggregate (silent, failed or rejected)."""
    error: str | None
    quantization_error: float = 0.0
    """Bound on the absolute error of each aggregated coordinate vs exact FedAvg."""
    warnings: list[str] = field(default_factory=list)
    total_weight: int = 0


class RoundFailed(RuntimeError):
    """The round cannot complete without revealing something; the global stays unchanged."""


class _Bad(ValueError):
    """One client's record is malformed or inconsistent: that client is dropped."""


class RingAccumulator:
    """The only place the server does ring arithmetic on client-derived vectors.

    It starts at zero, adds whole masked vectors and subtracts regenerated masks; tests
    subclass it to assert that no intermediate value equals an individual update.
    """

    def __init__(self, length: int, bits: int) -> None:
        self.bits = bits
        self.value = np.zeros(length, dtype=masks.ring_dtype(bits))

    def add_masked(self, node: int, vec: np.ndarray) -> None:
        np.add(self.value, vec, out=self.value)
        masks.reduce(self.value, self.bits)

    def remove_mask(self, seed: bytes, sign: int) -> None:
        masks.add_mask(self.value, seed, self.bits, -sign)

    def remove_masks(self, seeds: list[tuple[bytes, int]]) -> None:
        """Remove many masks (expanded in parallel, see :func:`masks.add_masks`)."""
        masks.add_masks(self.value, [(seed, -sign) for seed, sign in seeds], self.bits)


def _get(rec: ConfigRecord, key: str, kind, *, size: int | None = None, max_len: int = MAX_NODES):
    if key not in rec:
        raise _Bad(f"missing {key!r}")
    v = rec[key]
    if kind is bytes:
        if not isinstance(v, bytes) or (size is not None and len(v) != size) or len(v) > 4096:
            raise _Bad(f"malformed {key!r}")
    elif kind is int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise _Bad(f"malformed {key!r}")
    elif kind in _PACKED:
        try:
            return _PACKED[kind](v, max_len)
        except ValueError:
            raise _Bad(f"malformed {key!r}") from None
    return v


def _unpack_kinds(blob, max_count: int) -> list[int]:
    """Share kinds at unmask, one byte each (0: self-mask seed, 1: mask key)."""
    if not isinstance(blob, bytes) or len(blob) > max_count:
        raise ValueError("malformed share kinds")
    return list(blob)


_PACKED = {"ids": unpack_ids, "blobs": unpack_blobs, "kinds": _unpack_kinds}
"""Packed per-peer fields (see ``shared/secagg/protocol.py``), each parsed with a count cap."""


def _threshold_request(threshold, n: int) -> int:
    if not threshold:
        return 0
    if isinstance(threshold, float) and threshold <= 1.0:
        return math.ceil(threshold * n)
    return int(threshold)


class _Round:
    def __init__(self, grid: Grid, global_arrays: ArrayRecord, train_messages: list[Message], config: SecAggConfig):
        self.grid, self.config = grid, config
        self.global_arrays = global_arrays
        self.train = {int(m.metadata.dst_node_id): m for m in train_messages}
        if len(self.train) != len(train_messages):
            raise ValueError("train_messages must target distinct nodes")
        self.nodes = sorted(self.train)
        self.n = len(self.nodes)
        self.k = resolve_k(self.n, config.neighbours)
        self.t_req = _threshold_request(config.threshold, self.n)
        self.t, self.t_local = thresholds(self.n, self.k, self.t_req)
        self.sid = os.urandom(16)
        cfg = (get_record(train_messages[0].content, "config", ConfigRecord) if train_messages else None) or {}
        self.rnd = int(cfg.get("server-round", 0))
        self.group_id = str(self.rnd)
        self.warnings: list[str] = []
        self.ad: dict[int, dict] = {}
        self.alive: set[int] = set(self.nodes)
        self.graph = harary_graph(self.nodes, self.k, self.sid)

    def warn(self, text: str) -> None:
        log.warning("secure aggregation: %s", text)
        self.warnings.append(text)

    def exchange(self, stage: str, payloads: dict[int, RecordDict]) -> dict[int, RecordDict]:
        """One round trip. Returns one reply per node that answered well-formed; every node that
        did not is named once in the log, as a dropout or as a rejected client."""
        msgs = {
            nid: Message(content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=self.group_id)
            for nid, content in payloads.items()
        }
        replies = send_and_receive(self.grid, list(msgs.values()), self.config.timeout)
        by_msg_id = {m.metadata.message_id: nid for nid, m in msgs.items() if m.metadata.message_id}
        out: dict[int, RecordDict] = {}
        bad: dict[int, str] = {}
        for r in replies:
            src = int(r.metadata.src_node_id)
            expected = by_msg_id.get(r.metadata.reply_to_message_id) if by_msg_id else (src if src in msgs else None)
            if expected is None:
                continue  # not an answer to this stage (late reply of an earlier one)
            if r.has_error():
                if src == expected:
                    bad[expected] = f"refused: {r.error.reason}"
                else:  # the SuperLink answering for a node that is gone
                    self.warn(f"{stage}: node {expected} dropped out ({r.error.reason})")
                    bad[expected] = ""
                continue
            if src != expected:
                bad[expected] = f"reply came from node {src}"
                continue
            rec = get_record(r.content, RECORD, ConfigRecord)
            if rec is None or rec.get(Key.STAGE) != stage or rec.get(Key.NODE_ID) != src:
                bad[src] = "wrong stage or claimed node id"
                continue
            if src in out:
                bad[src] = "duplicate reply"
                continue
            out[src] = r.content
        for nid, why in bad.items():
            out.pop(nid, None)
            if why:
                self.warn(f"{stage}: node {nid} dropped from the round: {why}")
        for nid in sorted(set(msgs) - set(out) - set(bad)):
            self.warn(f"{stage}: node {nid} dropped out (no reply within {self.config.timeout:g} s)")
        return out

    def reject(self, stage: str, nid: int, why: str) -> None:
        self.warn(f"{stage}: node {nid} dropped from the round: {why}")

    def need(self, alive: Iterable[int], stage: str) -> None:
        alive = set(alive)
        self.alive = alive
        if len(alive) < self.t:
            raise RoundFailed(f"{stage}: only {len(alive)} clients left, threshold is {self.t}")

    def abort(self) -> None:
        """Best effort: tell every sampled node to wipe this round's secrets (they also wipe on
        any refused step and when the next round starts)."""
        try:
            msgs = [Message(RecordDict({RECORD: ConfigRecord({Key.STAGE: Stage.ABORT, Key.SID: self.sid})}),
                            dst_node_id=nid, message_type=MessageType.TRAIN, group_id=self.group_id)
                    for nid in self.nodes]
            send_and_receive(self.grid, msgs, min(self.config.timeout, 30.0))
        except Exception as exc:  # noqa: BLE001 - the round already failed; never crash the run here
            log.warning("secure aggregation: abort notice not delivered: %s", exc)

    # --- stages -----------------------------------------------------------------------
    def _setup(self) -> set[int]:
        content = RecordDict({RECORD: ConfigRecord({  # the same for every node: built once
            Key.STAGE: Stage.SETUP, Key.SID: self.sid, Key.ROUND: self.rnd, Key.NODES: pack_ids(self.nodes),
            Key.K: self.k, Key.T_REQ: self.t_req,
        })})
        replies = self.exchange(Stage.SETUP, dict.fromkeys(self.nodes, content))
        fps: dict[bytes, int] = {}
        for nid, content in replies.items():
            try:
                rec = content[RECORD]
                ad = {key: _get(rec, key, bytes, size=32) for key in (Key.PK_C, Key.PK_S, Key.COMMIT, Key.FP)}
                ad[Key.SIG] = _get(rec, Key.SIG, bytes)
                ad[Key.T], ad[Key.T_LOCAL] = _get(rec, Key.T, int), _get(rec, Key.T_LOCAL, int)
                if not (self.t <= ad[Key.T] <= self.n and self.t_local <= ad[Key.T_LOCAL] <= self.k + 1):
                    raise _Bad("thresholds outside the valid range")
                if ad[Key.FP] in fps:
                    raise _Bad(f"owner key already used by node {fps[ad[Key.FP]]}")
                if self.config.roster is not None:
                    pub = self.config.roster.get(ad[Key.FP])
                    data = ad_bytes(self.sid, self.rnd, nid, nodes_digest(self.nodes), self.k, ad[Key.T],
                                    ad[Key.T_LOCAL], ad[Key.PK_C], ad[Key.PK_S], ad[Key.COMMIT])
                    if pub is None or not identity.verify(pub, ad[Key.SIG], data):
                        raise _Bad("advertisement not signed by a registered owner key")
            except _Bad as exc:
                self.reject(Stage.SETUP, nid, str(exc))
                continue
            fps[ad[Key.FP]] = nid
            self.ad[nid] = ad
        u1 = set(self.ad)
        self.t = max([self.t, *(a[Key.T] for a in self.ad.values())])  # an owner may raise it
        self.need(u1, Stage.SETUP)
        return u1

    def _share_keys(self, u1: set[int]) -> tuple[set[int], dict[int, tuple[list[int], list[bytes]]]]:
        g = self.graph
        payloads = {}
        for i in sorted(u1):
            ids = sorted(g[i] & u1)
            payloads[i] = RecordDict({RECORD: ConfigRecord({
                Key.STAGE: Stage.SHARE_KEYS, Key.SID: self.sid, Key.ROUND: self.rnd, Key.IDS: pack_ids(ids),
                **{key: pack_blobs(self.ad[j][key] for j in ids)
                   for key in (Key.PK_C, Key.PK_S, Key.COMMIT, Key.FP, Key.SIG)},
            })})
        replies = self.exchange(Stage.SHARE_KEYS, payloads)
        fwd: dict[int, tuple[list[int], list[bytes]]] = {i: ([], []) for i in u1}
        u2 = set()
        accused: dict[int, int] = {}
        parsed = {}
        for src, content in replies.items():
            try:
                rec = content[RECORD]
                dsts = _get(rec, Key.DST, "ids", max_len=self.k)
                cts = _get(rec, Key.CT, "blobs", max_len=self.k)
                bad = _get(rec, Key.REJECTED, "ids", max_len=self.k) if Key.REJECTED in rec else []
                if len(dsts) != len(cts) or len(set(dsts)) != len(dsts) or not set(dsts) <= g[src] & u1:
                    raise _Bad("shares addressed to the wrong set of nodes")
                if len(dsts) + 1 < self.ad[src][Key.T_LOCAL]:
                    raise _Bad("too few shares to ever rebuild its secrets")
            except _Bad as exc:
                self.reject(Stage.SHARE_KEYS, src, str(exc))
                continue
            parsed[src] = (dsts, cts)
            for j in bad:
                if j in g[src]:
                    accused.setdefault(j, src)
        if self.config.roster is not None:  # the server verified every advertisement: the accuser lies
            for j, by in sorted(accused.items()):
                if by in parsed:
                    self.reject(Stage.SHARE_KEYS, by, f"rejected node {j}'s valid advertisement")
                    del parsed[by]
            accused = {}
        for j, by in sorted(accused.items()):
            if j in parsed:  # a neighbour could not authenticate its advertisement against the roster
                self.reject(Stage.SHARE_KEYS, j, f"advertisement rejected by node {by} (signature or roster)")
                del parsed[j]
        for src, (dsts, cts) in parsed.items():
            dsts, cts = zip(*[(d, c) for d, c in zip(dsts, cts) if d not in accused]) if dsts else ((), ())
            u2.add(src)
            for dst, ct in zip(dsts, cts):
                fwd[dst][0].append(src)
                fwd[dst][1].append(ct)
        self.need(u2, Stage.SHARE_KEYS)
        return u2, fwd

    def _collect(self, u2, fwd, fmt: RingFormat, length: int, acc: "RingAccumulator"):
        g = self.graph
        payloads = {}
        for i in sorted(u2):
            content = RecordDict(dict(self.train[i].content.items()))
            srcs, cts = fwd[i]
            keep = [p for p, s in enumerate(srcs) if s in u2]
            content[RECORD] = ConfigRecord({
                Key.STAGE: Stage.COLLECT, Key.SID: self.sid, Key.ROUND: self.rnd,
                Key.SRC: pack_ids(srcs[p] for p in keep), Key.CT: pack_blobs(cts[p] for p in keep),
                Key.MASK_NBRS: pack_ids(sorted(g[i] & u2)), Key.BITS: fmt.bits, Key.SCALE: fmt.scale,
                Key.MAX_WEIGHT: fmt.max_weight, Key.CLIP: fmt.clip,
            })
            payloads[i] = content
        replies = self.exchange(Stage.COLLECT, payloads)
        u3: set[int] = set()
        metrics: dict[int, MetricRecord] = {}
        for nid, content in sorted(replies.items()):
            try:
                rec = content[RECORD]
                rejected = _get(rec, Key.REJECTED, "ids", max_len=self.k) if Key.REJECTED in rec else []
                vec = self._masked_vector(content, length, fmt)
                m = get_record(content, "metrics", MetricRecord) or MetricRecord()
                if set(content) - {RECORD, "metrics", MASKED_RECORD} or len(m) > 64:
                    raise _Bad("unexpected records next to the masked vector")
            except _Bad as exc:
                self.reject(Stage.COLLECT, nid, str(exc))
                continue
            if rejected:
                self.warn(f"collect-masked: node {nid} rejected shares from {sorted(set(rejected))}")
            acc.add_masked(nid, vec)
            del vec
            u3.add(nid)
            metrics[nid] = MetricRecord(dict(m))
            metrics[nid]["node-id"] = nid  # server-side only: tells deployed clients apart in the report
        self.need(u3, Stage.COLLECT)
        return u3, metrics

    def _consistency_and_unmask(self, u2: set[int], u3: set[int]):
        survivors = sorted(u3)
        base = {Key.SID: self.sid, Key.ROUND: self.rnd, Key.SURVIVORS: pack_ids(survivors)}
        content = RecordDict({RECORD: ConfigRecord({Key.STAGE: Stage.CONSISTENCY, **base})})
        replies = self.exchange(Stage.CONSISTENCY, dict.fromkeys(survivors, content))
        sigs: dict[int, bytes] = {}
        for nid, content in replies.items():
            try:
                sigs[nid] = _get(content[RECORD], Key.SIG, bytes)
            except _Bad as exc:
                self.reject(Stage.CONSISTENCY, nid, str(exc))
        if len(sigs) < self.t:
            raise RoundFailed(f"consistency: {len(sigs)} clients signed the survivor set, threshold is {self.t}")
        g = self.graph
        payloads = {}
        for i in sorted(sigs):
            ids = sorted((g[i] & set(sigs)))
            payloads[i] = RecordDict({RECORD: ConfigRecord({
                Key.STAGE: Stage.UNMASK, **base, Key.IDS: pack_ids(ids), Key.SIG: pack_blobs(sigs[j] for j in ids)})})
        replies = self.exchange(Stage.UNMASK, payloads)
        dead = u2 - u3
        b_shares: dict[int, list[bytes]] = {j: [] for j in u3}
        sk_shares: dict[int, list[bytes]] = {j: [] for j in dead}
        for holder, content in replies.items():
            try:
                rec = content[RECORD]
                ids = _get(rec, Key.IDS, "ids", max_len=self.k + 1)
                kinds = _get(rec, Key.KIND, "kinds", max_len=self.k + 1)
                shares = _get(rec, Key.SHARES, "blobs", max_len=self.k + 1)
                if not len(ids) == len(kinds) == len(shares) or len(set(ids)) != len(ids):
                    raise _Bad("malformed share list")
                items = []
                for j, kind, share in zip(ids, kinds, shares):
                    if len(share) != shamir.SHARE_LEN or j not in g[holder] | {holder}:
                        raise _Bad(f"share for node {j} malformed or not held by it")
                    if kind == 0 and j in u3:
                        items.append((b_shares[j], share))
                    elif kind == 1 and j in dead:
                        items.append((sk_shares[j], share))
                    else:
                        raise _Bad(f"share of the wrong kind for node {j}")
            except _Bad as exc:
                self.reject(Stage.UNMASK, holder, str(exc))
                continue
            for lst, share in items:
                lst.append(share)
        return b_shares, sk_shares, dead

    def _recover(self, shares: list[bytes], t_local: int, check, what: str) -> bytes:
        """Rebuild a secret from >= t_local shares, tolerating wrong shares by trying subsets."""
        if len(shares) < t_local:
            raise RoundFailed(f"unmask: {len(shares)} shares of the {what}, need {t_local}")
        tries = 0
        for subset in itertools.combinations(shares, t_local):
            tries += 1
            if tries > 64:
                break
            try:
                secret = shamir.combine(list(subset), t_local)
            except ValueError:
                continue
            if check(secret):
                return secret
        raise RoundFailed(f"unmask: cannot rebuild the {what} from its shares")

    def run(self) -> tuple[np.ndarray, int, RingFormat, list[MetricRecord], set[int]]:
        u1 = self._setup()
        u2, fwd = self._share_keys(u1)
        w = 1 if self.config.equal_weights else int(self.config.max_weight or DEFAULT_MAX_WEIGHT)
        fmt = choose_format(self.n, max_weight=w, clip=self.config.update_bound or DEFAULT_CLIP, bits=self.config.bits)
        length = sum(int(np.prod(a.shape)) for a in self.global_arrays.values()) + 1
        acc = RingAccumulator(length, fmt.bits)
        u3, metrics = self._collect(u2, fwd, fmt, length, acc)
        b_shares, sk_shares, dead = self._consistency_and_unmask(u2, u3)
        # All secrets rebuilt in one vectorized pass; a secret whose first shares do not match its
        # commitment / public key (a lying holder) is retried from other subsets of its shares.
        alive, gone = sorted(u3), sorted(dead)
        fast = shamir.combine_many([b_shares[j] for j in alive] + [sk_shares[j] for j in gone],
                                   [self.ad[j][Key.T_LOCAL] for j in alive + gone])
        seeds = []
        for j, seed in zip(alive, fast[: len(alive)]):
            check = lambda s, j=j: crypto.commit_seed(self.sid, j, s) == self.ad[j][Key.COMMIT]
            if seed is None or not check(seed):
                seed = self._recover(b_shares[j], self.ad[j][Key.T_LOCAL], check, f"self-mask seed of node {j}")
            seeds.append((seed, +1))
        for j, sk in zip(gone, fast[len(alive):]):
            check = lambda s, j=j: crypto.public_from_private(s) == self.ad[j][Key.PK_S]
            if sk is None or not check(sk):
                sk = self._recover(sk_shares[j], self.ad[j][Key.T_LOCAL], check, f"mask key of dropped node {j}")
            nbrs = sorted(self.graph[j] & u3)
            for i, sec in zip(nbrs, crypto.agree_many(sk, [self.ad[i][Key.PK_S] for i in nbrs])):
                seeds.append((crypto.pair_mask_seed(sec, self.sid, self.rnd, i, j), +1 if i < j else -1))
        acc.remove_masks(seeds)
        # Out-of-range sum: more than |u3| honest clients could produce means a client lied.
        signed = to_signed(masks.reduce(acc.value.copy(), fmt.bits), fmt.bits)
        limit = len(u3) * fmt.max_weight * fmt.clip * fmt.scale
        if signed.size > 1 and float(np.max(np.abs(signed[:-1]))) > limit + len(u3):
            raise RoundFailed("overflow: the unmasked sum is out of range (a client sent an out-of-range update)")
        try:
            wsum, total = decode_sum(acc.value, fmt, len(u3))
        except QuantizationOverflow as exc:
            raise RoundFailed(f"overflow: {exc}") from exc
        return wsum, total, fmt, [metrics[i] for i in sorted(u3)], u3

    @staticmethod
    def _masked_vector(content: RecordDict, length: int, fmt: RingFormat) -> np.ndarray:
        rec = get_record(content, MASKED_RECORD, ArrayRecord)
        if rec is None or list(rec.keys()) != ["masked"]:
            raise _Bad("no masked vector")
        try:
            return ring_vector(rec["masked"], length, fmt.dtype)
        except ValueError as exc:
            raise _Bad(str(exc)) from exc


def apply_mean(global_arrays: ArrayRecord, wsum: np.ndarray, total: int) -> ArrayRecord:
    """global + wsum / total, tensor by tensor, in the global's dtypes."""
    out: dict[str, Array] = {}
    pos = 0
    for key, arr in global_arrays.items():
        g = array_view(arr)
        size = int(np.prod(g.shape))
        if total > 0:
            g = (g.astype(np.float64) + (wsum[pos: pos + size] / total).reshape(g.shape)).astype(g.dtype)
        out[key] = Array(np.ascontiguousarray(g))
        pos += size
    return ArrayRecord(out)


def secure_aggregate(
    grid: Grid, global_arrays: ArrayRecord, train_messages: list[Message], config: SecAggConfig
) -> SecAggResult:
    """Run one secure round: arrays = global + weighted mean of the survivors' deltas.

    Protocol failures (too few survivors, out-of-range sum, unrecoverable shares) return
    ``arrays=None`` with ``error`` set; the caller keeps the previous global.
    """
    nodes = sorted(int(m.metadata.dst_node_id) for m in train_messages)
    if len(nodes) < 2:
        return SecAggResult(None, [], nodes, "secure aggregation needs at least 2 sampled clients")
    rnd = _Round(grid, global_arrays, train_messages, config)
    try:
        wsum, total, fmt, metrics, u3 = rnd.run()
    except RoundFailed as exc:
        log.error("secure aggregation round failed: %s", exc)
        rnd.abort()
        return SecAggResult(None, [], sorted(set(nodes) - rnd.alive), str(exc), warnings=rnd.warnings)
    return SecAggResult(
        arrays=apply_mean(global_arrays, wsum, total), metrics=metrics, dropped=sorted(set(nodes) - u3), error=None,
        quantization_error=fmt.error_bound(len(u3), total), warnings=rnd.warnings, total_weight=total,
    )


class SecureAggregation(Strategy):
    """Secure aggregation around any Flower strategy, like Flower's DP strategy wrappers.

    The wrapped strategy samples the clients (``configure_train``) and turns the aggregate
    into the next model (``aggregate_train``: FedAvg takes it, FedAdam/FedYogi/... take a
    server-optimizer step from it). Secure aggregation only decides how the weighted sum is
    computed: the wrapped strategy sees one reply carrying the weighted mean model and the
    total weight, never a client's update. Use :meth:`train_round` from a custom loop, or
    ``SecureAggregation(FedAdam(...)).start(grid, arrays, num_rounds)`` like any strategy.
    """

    def __init__(self, strategy: Strategy, config: SecAggConfig | None = None,
                 weighted_by_key: str | None = None) -> None:
        self.strategy = strategy
        self.config = config or SecAggConfig()
        self.weighted_by_key = weighted_by_key or getattr(strategy, "weighted_by_key", "num-examples")
        self._pending: tuple | None = None
        self.last_result: SecAggResult | None = None

    def __getattr__(self, name):  # anything else is the wrapped strategy's
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord):
        """(new arrays or None, SecAggResult, what the wrapped aggregate_train returned)."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        result = secure_aggregate(grid, arrays, messages, self.config)
        self.last_result = result
        if result.error or result.arrays is None or result.total_weight <= 0:
            return None, result, None
        reply = Message(RecordDict({"arrays": result.arrays,
                                    "metrics": MetricRecord({self.weighted_by_key: int(result.total_weight)})}),
                        dst_node_id=0, message_type=MessageType.TRAIN, group_id=str(server_round))
        aggregated = self.strategy.aggregate_train(server_round, [reply])
        new_arrays = aggregated[0] if isinstance(aggregated, tuple) else aggregated
        return new_arrays, result, aggregated

    # Flower's Strategy interface, so Strategy.start() drives secure rounds: configure_train
    # only remembers the round's inputs (the outer loop then sends nothing) and
    # aggregate_train runs the whole secure round.
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._pending = (grid, arrays, config)
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        if self._pending is None:
            return None, None
        grid, arrays, config = self._pending
        self._pending = None
        new_arrays, _, aggregated = self.train_round(grid, server_round, arrays, config)
        if aggregated is None:
            return None, None
        return aggregated if isinstance(aggregated, tuple) else (new_arrays, None)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log.info("\t├── Secure aggregation (SecAgg+, malicious-server hardened) around:")
        self.strategy.summary()
