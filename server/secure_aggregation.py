"""Server side of secure aggregation (SecAgg+-style, Bonawitz et al. 2017; Bell et al. 2020).

Four round trips over ``grid.send_and_receive``:

1. setup: each sampled node gets its neighbours in a random k-regular graph and answers
   with two X25519 public keys (share encryption, mask agreement) and a commitment to its
   self-mask seed.
2. share-keys: each node gets its neighbours' public keys and returns Shamir shares of
   its self-mask seed and mask key, AES-GCM encrypted for each neighbour; the server only
   relays ciphertexts.
3. collect-masked: the original TRAIN content plus the relayed shares; each node trains,
   encodes ``[w * delta, w]`` in Z_{2^b} and adds its self mask and pairwise masks. Metrics
   come back in clear (as with plain FedAvg), the update only masked.
4. unmask: survivors reveal, per neighbour, the self-mask-seed share (neighbour alive) or
   the mask-key share (neighbour dropped), never both; the server strips the masks from the
   *sum* and divides by the unmasked total weight.

Shares go to the k graph neighbours (SecAgg+), with per-neighbourhood threshold
``t_local = ceil(t/n * (k+1))``: that keeps Shamir work O(k) per node, where sharing with
all n would cost seconds of pure-Python GF(2^128) arithmetic per node at 100 clients. With
``neighbours = n - 1`` (complete graph) ``t_local = t`` and any ``n - t`` dropouts after
masking are tolerated; with sparser graphs a round survives as long as every affected
neighbourhood keeps ``t_local`` live members, and otherwise fails cleanly.

Every ring vector the server handles passes through :class:`RingAccumulator`, which only
ever holds the running sum of masked vectors minus regenerated masks.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from shared.secagg import crypto, masks, shamir
from shared.secagg.protocol import RECORD, Key, Stage
from shared.secagg.quantize import (
    DEFAULT_CLIP,
    DEFAULT_MAX_WEIGHT,
    QuantizationOverflow,
    RingFormat,
    choose_format,
    decode_sum,
)

log = logging.getLogger("flwr")

MASKED_RECORD = "secagg-masked"


@dataclass
class SecAggConfig:
    """Protocol parameters.

    ``threshold``: fraction of the sampled clients (float <= 1) or absolute count; default
    2/3 of n, at least 2. ``neighbours``: degree k of the random mask/share graph; default
    max(2, ceil(log2 n)), capped to n - 1. ``bits``: ring size, auto from n and the bounds.
    ``update_bound``: declared bound on each client's |delta|_inf (e.g. from DP clipping);
    larger updates make the round fail with an overflow error rather than wrap.
    ``max_weight``: declared cap on a client's num-examples.
    """

    threshold: float | int | None = None
    neighbours: int | None = None
    bits: int | None = None
    timeout: float = 3600.0
    update_bound: float | None = None
    max_weight: int | None = None


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


class RoundFailed(RuntimeError):
    """The round cannot complete without revealing something; the global stays unchanged."""


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


def resolve_threshold(threshold: float | int | None, n: int) -> int:
    if threshold is None:
        t = math.ceil(2 * n / 3)
    elif isinstance(threshold, float) and threshold <= 1.0:
        t = math.ceil(threshold * n)
    else:
        t = int(threshold)
    return min(n, max(2, t))


def resolve_neighbours(neighbours: int | None, n: int) -> int:
    k = max(2, math.ceil(math.log2(n))) if neighbours is None else int(neighbours)
    k = max(1, min(k, n - 1))
    if (k * n) % 2:
        k = k + 1 if k + 1 <= n - 1 else k - 1
    return k


def random_regular_graph(nodes: list[int], k: int, rng: secrets.SystemRandom | None = None) -> dict[int, set[int]]:
    """Random simple k-regular graph: a circulant on a random permutation, then degree-preserving
    double-edge swaps to randomise it (needs k * n even)."""
    rng = rng or secrets.SystemRandom()
    n = len(nodes)
    if not 0 < k < n or (k * n) % 2:
        raise ValueError(f"no simple {k}-regular graph on {n} nodes")
    order = list(nodes)
    rng.shuffle(order)
    edges: set[tuple[int, int]] = set()
    for i in range(n):
        for off in range(1, k // 2 + 1):
            a, b = order[i], order[(i + off) % n]
            edges.add((min(a, b), max(a, b)))
        if k % 2:
            a, b = order[i], order[(i + n // 2) % n]
            edges.add((min(a, b), max(a, b)))
    if k < n - 1:
        elist = list(edges)
        for _ in range(10 * len(elist)):
            i1, i2 = rng.randrange(len(elist)), rng.randrange(len(elist))
            (a, b), (c, d) = elist[i1], elist[i2]
            if rng.random() < 0.5:
                c, d = d, c
            if len({a, b, c, d}) < 4:
                continue
            e1, e2 = (min(a, d), max(a, d)), (min(c, b), max(c, b))
            if e1 in edges or e2 in edges:
                continue
            edges.difference_update({elist[i1], elist[i2]})
            edges.update({e1, e2})
            elist[i1], elist[i2] = e1, e2
    graph: dict[int, set[int]] = {v: set() for v in nodes}
    for a, b in edges:
        graph[a].add(b)
        graph[b].add(a)
    return graph


class _Round:
    def __init__(self, grid: Grid, global_arrays: ArrayRecord, train_messages: list[Message], config: SecAggConfig):
        self.grid, self.config = grid, config
        self.global_arrays = global_arrays
        self.train = {int(m.metadata.dst_node_id): m for m in train_messages}
        if len(self.train) != len(train_messages):
            raise ValueError("train_messages must target distinct nodes")
        self.nodes = sorted(self.train)
        self.n = len(self.nodes)
        self.t = resolve_threshold(config.threshold, self.n)
        self.k = resolve_neighbours(config.neighbours, self.n) if self.n >= 2 else 0
        self.t_local = min(self.k + 1, max(2, math.ceil(self.t / self.n * (self.k + 1))))
        self.sid = os.urandom(16)
        cfg = train_messages[0].content.config_records.get("config", ConfigRecord()) if train_messages else {}
        self.rnd = int(cfg.get("server-round", 0))
        self.group_id = str(self.rnd)
        self.warnings: list[str] = []
        self.pk_c: dict[int, bytes] = {}
        self.pk_s: dict[int, bytes] = {}
        self.commit: dict[int, bytes] = {}
        self.alive: set[int] = set(self.nodes)

    def fail(self, why: str) -> RoundFailed:
        return RoundFailed(why)

    def exchange(self, stage: str, payloads: dict[int, RecordDict]) -> dict[int, RecordDict]:
        """One round trip; keeps only well-formed replies from the node the request went to."""
        msgs = {
            nid: Message(content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=self.group_id)
            for nid, content in payloads.items()
        }
        replies = list(self.grid.send_and_receive(list(msgs.values()), timeout=self.config.timeout))
        by_msg_id = {m.metadata.message_id: nid for nid, m in msgs.items() if m.metadata.message_id}
        out: dict[int, RecordDict] = {}
        for r in replies:
            src = int(r.metadata.src_node_id)
            expected = by_msg_id.get(r.metadata.reply_to_message_id) if by_msg_id else (src if src in msgs else None)
            if expected is None or src != expected:
                self.warn(f"{stage}: rejected reply from node {src} to a request for node {expected}")
                continue
            if r.has_error():
                self.warn(f"{stage}: node {src} replied with an error: {r.error.reason}")
                continue
            rec = r.content.config_records.get(RECORD)
            if rec is None or rec.get(Key.STAGE) != stage or rec.get(Key.NODE_ID) != src:
                self.warn(f"{stage}: rejected reply from node {src}: wrong stage or claimed node id")
                continue
            if src in out:
                self.warn(f"{stage}: duplicate reply from node {src} ignored")
                continue
            out[src] = r.content
        return out

    def warn(self, text: str) -> None:
        log.warning("secure aggregation: %s", text)
        self.warnings.append(text)

    def need(self, alive: Iterable[int], stage: str) -> None:
        alive = list(alive)
        if len(alive) < self.t:
            raise self.fail(f"{stage}: only {len(alive)} clients left, threshold is {self.t}")

    def run(self) -> SecAggResult:
        g = random_regular_graph(self.nodes, self.k)
        self.graph = g
        # 1. setup
        replies = self.exchange(Stage.SETUP, {
            nid: RecordDict({RECORD: ConfigRecord({
                Key.STAGE: Stage.SETUP, Key.SID: self.sid, Key.ROUND: self.rnd,
                Key.NEIGHBOURS: sorted(g[nid]), Key.LOCAL_THRESHOLD: self.t_local,
                Key.GLOBAL_THRESHOLD: self.t,
            })}) for nid in self.nodes
        })
        for nid, content in replies.items():
            rec = content[RECORD]
            pk_c, pk_s, cm = rec.get(Key.PK_C), rec.get(Key.PK_S), rec.get("commit-b")
            if all(isinstance(x, bytes) and len(x) == 32 for x in (pk_c, pk_s, cm)):
                self.pk_c[nid], self.pk_s[nid], self.commit[nid] = pk_c, pk_s, cm
        u1 = set(self.pk_c)
        while True:  # nodes whose neighbourhood is too thin cannot share their secrets
            thin = {i for i in u1 if len(g[i] & u1) + 1 < self.t_local}
            if not thin:
                break
            u1 -= thin
        self.alive = set(u1)
        self.need(u1, Stage.SETUP)

        # 2. share keys
        replies = self.exchange(Stage.SHARE_KEYS, {
            i: RecordDict({RECORD: ConfigRecord({
                Key.STAGE: Stage.SHARE_KEYS, Key.SID: self.sid, Key.ROUND: self.rnd,
                Key.IDS: (ids := sorted(g[i] & u1)),
                Key.PK_C: [self.pk_c[j] for j in ids], Key.PK_S: [self.pk_s[j] for j in ids],
            })}) for i in sorted(u1)
        })
        fwd: dict[int, tuple[list[int], list[bytes]]] = {i: ([], []) for i in u1}
        u2 = set()
        for src, content in replies.items():
            rec = content[RECORD]
            dsts, cts = list(rec.get(Key.DST, [])), list(rec.get(Key.CT, []))
            if len(dsts) != len(cts) or set(dsts) != g[src] & u1:
                self.warn(f"share-keys: node {src} sent shares to the wrong set of nodes")
                continue
            u2.add(src)
            for dst, ct in zip(dsts, cts):
                fwd[dst][0].append(src)
                fwd[dst][1].append(ct)
        self.alive = set(u2)
        self.need(u2, Stage.SHARE_KEYS)

        # 3. collect masked vectors
        fmt = choose_format(
            len(u2), max_weight=self.config.max_weight or DEFAULT_MAX_WEIGHT,
            clip=self.config.update_bound or DEFAULT_CLIP, bits=self.config.bits,
        )
        length = sum(int(np.prod(a.shape)) for a in self.global_arrays.values()) + 1
        payloads = {}
        for i in sorted(u2):
            content = RecordDict(dict(self.train[i].content.items()))
            srcs, cts = fwd[i]
            keep = [p for p, s in enumerate(srcs) if s in u2]
            content[RECORD] = ConfigRecord({
                Key.STAGE: Stage.COLLECT, Key.SID: self.sid, Key.ROUND: self.rnd,
                Key.SRC: [srcs[p] for p in keep], Key.CT: [cts[p] for p in keep],
                Key.NEIGHBOURS: sorted(g[i] & u2), Key.BITS: fmt.bits, Key.SCALE: fmt.scale,
                Key.MAX_WEIGHT: fmt.max_weight, Key.CLIP: fmt.clip,
            })
            payloads[i] = content
        replies = self.exchange(Stage.COLLECT, payloads)
        acc = RingAccumulator(length, fmt.bits)
        u3: set[int] = set()
        metrics: dict[int, MetricRecord] = {}
        overflow = []
        for nid, content in sorted(replies.items()):
            rec = content[RECORD]
            if rec.get(Key.OVERFLOW):
                overflow.append(f"node {nid}: {rec.get(Key.OVERFLOW_REASON, 'overflow')}")
                continue
            vec = self._masked_vector(content, length, fmt)
            if vec is None:
                self.warn(f"collect-masked: node {nid} sent a malformed masked vector")
                continue
            if rec.get(Key.REJECTED):
                self.warn(f"collect-masked: node {nid} rejected shares from {list(rec[Key.REJECTED])}")
            acc.add_masked(nid, vec)
            del vec
            u3.add(nid)
            metrics[nid] = content.metric_records.get("metrics", MetricRecord())
            metrics[nid]["node-id"] = nid  # server-side only: tells deployed clients apart in the report
        if overflow:
            raise self.fail("overflow: update outside the declared bound (" + "; ".join(overflow) + ")")
        self.alive = set(u3)
        self.need(u3, Stage.COLLECT)
        dead = u2 - u3

        # 4. unmask
        replies = self.exchange(Stage.UNMASK, {
            i: RecordDict({RECORD: ConfigRecord({
                Key.STAGE: Stage.UNMASK, Key.SID: self.sid, Key.ROUND: self.rnd,
                Key.SURVIVORS: sorted((g[i] | {i}) & u3), Key.DROPPED: sorted(g[i] & dead),
                Key.N_SURVIVORS: len(u3),
            })}) for i in sorted(u3)
        })
        if silent := sorted(u3 - set(replies)):
            self.warn(f"unmask: nodes {silent} did not answer; their masked updates are still aggregated")
        b_shares: dict[int, list[bytes]] = {j: [] for j in u3}
        sk_shares: dict[int, list[bytes]] = {j: [] for j in dead}
        for holder, content in replies.items():
            rec = content[RECORD]
            for j, share in zip(rec.get(Key.IDS, []), rec.get(Key.SHARES, [])):
                j = int(j)
                if j in u3 and j in g[holder] | {holder}:
                    b_shares[j].append(share)
                elif j in dead and j in g[holder]:
                    sk_shares[j].append(share)
        for j in sorted(u3):
            seed = self._recover(b_shares[j], f"self-mask seed of node {j}")
            if crypto.commit_seed(self.sid, j, seed) != self.commit[j]:
                raise self.fail(f"unmask: reconstructed self-mask seed of node {j} does not match its commitment")
            acc.remove_mask(seed, +1)
        for j in sorted(dead):
            sk = self._recover(sk_shares[j], f"mask key of dropped node {j}")
            if crypto.public_from_private(sk) != self.pk_s[j]:
                raise self.fail(f"unmask: reconstructed mask key of node {j} does not match its public key")
            for i in sorted(g[j] & u3):
                seed = crypto.pair_mask_seed(crypto.agree(sk, self.pk_s[i]), self.sid, self.rnd, i, j)
                acc.remove_mask(seed, +1 if i < j else -1)

        try:
            wsum, total = decode_sum(acc.value, fmt, len(u3))
        except QuantizationOverflow as exc:
            raise self.fail(f"overflow: {exc}") from exc
        claimed = sum(0 if m.get("declined", 0) else int(m.get("num-examples", 1)) for m in metrics.values())
        if total != claimed:
            raise self.fail(f"integrity: unmasked total weight {total} != reported num-examples {claimed}")
        arrays = self._apply(wsum, total)
        return SecAggResult(
            arrays=arrays, metrics=[metrics[i] for i in sorted(u3)],
            dropped=sorted(set(self.nodes) - u3), error=None,
            quantization_error=fmt.error_bound(len(u3), total), warnings=self.warnings,
        )

    def _recover(self, shares: list[bytes], what: str) -> bytes:
        if len(shares) < self.t_local:
            raise self.fail(f"unmask: {len(shares)} shares of the {what}, need {self.t_local}")
        try:
            return shamir.combine(shares, self.t_local)
        except ValueError as exc:
            raise self.fail(f"unmask: cannot recover the {what}: {exc}") from exc

    @staticmethod
    def _masked_vector(content: RecordDict, length: int, fmt: RingFormat) -> np.ndarray | None:
        rec = content.array_records.get(MASKED_RECORD)
        if rec is None or "masked" not in rec:
            return None
        arr = rec["masked"]
        if tuple(arr.shape) != (length,):
            return None
        vec = arr.numpy()
        return vec if vec.dtype == fmt.dtype and vec.shape == (length,) else None

    def _apply(self, wsum: np.ndarray, total: int) -> ArrayRecord:
        out: dict[str, Array] = {}
        pos = 0
        for key, arr in self.global_arrays.items():
            g = arr.numpy()
            size = int(np.prod(g.shape))
            if total > 0:
                new = g.astype(np.float64) + (wsum[pos : pos + size] / total).reshape(g.shape)
                g = new.astype(g.dtype)
            out[key] = Array(np.ascontiguousarray(g))
            pos += size
        return ArrayRecord(out)


def secure_aggregate(
    grid: Grid, global_arrays: ArrayRecord, train_messages: list[Message], config: SecAggConfig
) -> SecAggResult:
    """Run one secure FedAvg round: new global = global + weighted mean of client deltas.

    Protocol failures (too few survivors, overflow, unrecoverable shares) return
    ``arrays=None`` with ``error`` set; the caller keeps the previous global.
    """
    nodes = sorted(int(m.metadata.dst_node_id) for m in train_messages)
    if len(nodes) < 2:
        return SecAggResult(None, [], nodes, "secure aggregation needs at least 2 sampled clients")
    rnd = _Round(grid, global_arrays, train_messages, config)
    try:
        return rnd.run()
    except RoundFailed as exc:
        log.error("secure aggregation round failed: %s", exc)
        return SecAggResult(None, [], sorted(set(nodes) - rnd.alive), str(exc), warnings=rnd.warnings)
