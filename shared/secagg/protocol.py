"""Wire format, round parameters and the mask/share graph, shared by server workflow and client mod.

Kept in one place so both sides agree without importing each other. Every number a client
relies on for its privacy (thresholds, graph, survivor count) is recomputed here by the
client from the round's public inputs; the server can only *raise* the thresholds.

Round parameters for ``n`` sampled clients and graph degree ``k``:

* the mask/share graph is the Harary graph H(k, n) (a circulant with offsets 1..k/2, plus the
  diameters for odd k) on a permutation of the nodes drawn from the session id. It is
  k-vertex-connected by construction: removing any k - 1 nodes leaves it connected.
* ``t_local = floor((k + 1) / 2) + 1``: more than half of each owner's neighbourhood (itself
  and its k neighbours) must reveal before a secret is rebuilt. An honest holder reveals,
  per owner, either the self-mask share or the mask-key share, never both, so no server can
  collect both halves of one owner from a strict majority twice.
* tolerance ``f = k + 1 - t_local`` (< k): any f dropouts after key sharing leave every
  neighbourhood with t_local live holders and the survivors' graph connected.
* ``t = max(floor(n / 2) + 1, n - f)``: the round recovers whenever at least t clients
  survive, and clients refuse to unmask below it. Owners raise t_local and t through their
  local config (``secagg-min-fraction``), the server through its config; nobody can lower them.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from functools import lru_cache

import numpy as np
from flwr.app import Array

RECORD = "secagg"
"""ConfigRecord name carrying the protocol payloads in both directions."""

STATE_RECORD = "secagg-state"
"""ConfigRecord in ``context.state`` holding the client's secrets for the current round only."""

MASKED_RECORD = "secagg-masked"
"""ArrayRecord name of the masked vector (an ArrayRecord so Flower can chunk large payloads)."""

RING_STYPE = "fedlora.secagg.ring"
"""Array ``stype`` of the masked vector: its raw little-endian ring elements, no npy header.
Both ends are ours, so the 1-8 MB vector skips ``np.save``/``np.load`` (a header parse and two
copies each way); the receiver checks dtype, shape and byte length before viewing it."""

PROTOCOL_ID = b"fedlora-secagg-v2"

MAX_NODES = 10_000


class Stage:
    """Protocol stages, in order; each is one server -> clients -> server round trip."""

    SETUP = "setup"
    SHARE_KEYS = "share-keys"
    COLLECT = "collect-masked"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    ABORT = "abort"
    """Sent by the server when a round fails: clients wipe the round's secrets."""


ORDER = {Stage.SETUP: Stage.SHARE_KEYS, Stage.SHARE_KEYS: Stage.COLLECT,
         Stage.COLLECT: Stage.CONSISTENCY, Stage.CONSISTENCY: Stage.UNMASK}


class Key:
    """Keys inside the ``secagg`` ConfigRecord."""

    STAGE = "stage"
    SID = "sid"
    ROUND = "round"
    NODE_ID = "node-id"
    NODES = "nodes"
    K = "k"
    T_REQ = "t-request"
    T = "t"
    T_LOCAL = "t-local"
    PK_C = "pk-c"
    PK_S = "pk-s"
    COMMIT = "commit-b"
    FP = "fingerprint"
    SIG = "sig"
    IDS = "ids"
    DST = "dst"
    SRC = "src"
    CT = "ct"
    BITS = "bits"
    SCALE = "scale"
    MAX_WEIGHT = "max-weight"
    CLIP = "clip"
    MASK_NBRS = "mask-neighbours"
    REJECTED = "rejected"
    SURVIVORS = "survivors"
    SHARES = "shares"
    KIND = "kind"


def pack_ids(ids) -> bytes:
    """Node ids as one bytes value (uint64 LE): n-sized lists travel and are stored without
    Flower's per-element record validation."""
    ids = list(ids)
    return struct.pack(f"<{len(ids)}Q", *ids)


def unpack_ids(blob, max_count: int = MAX_NODES) -> list[int]:
    if not isinstance(blob, bytes) or len(blob) % 8 or len(blob) > 8 * max_count:
        raise ValueError("malformed node id list")
    return list(struct.unpack(f"<{len(blob) // 8}Q", blob))


def pack_blobs(items) -> bytes:
    """Per-peer byte strings (keys, signatures, ciphertexts, shares) as one bytes value, each
    prefixed with its 2-byte length: one record entry per stage instead of a list whose every
    element Flower type-checks and copies."""
    return b"".join(struct.pack("<H", len(x)) + x for x in items)


def unpack_blobs(blob, max_count: int = MAX_NODES, max_len: int = 4096) -> list[bytes]:
    """Inverse of :func:`pack_blobs`; ValueError on anything else (truncated, too many, too long)."""
    if not isinstance(blob, bytes):
        raise ValueError("malformed byte-string list")
    out: list[bytes] = []
    pos, end = 0, len(blob)
    while pos < end:
        if len(out) >= max_count or pos + 2 > end:
            raise ValueError("malformed byte-string list")
        size = blob[pos] | blob[pos + 1] << 8  # the 2-byte little-endian length
        pos += 2
        if size > max_len or pos + size > end:
            raise ValueError("malformed byte-string list")
        out.append(blob[pos: pos + size])
        pos += size
    return out


def get_record(records, name: str, kind: type):
    """``records[name]`` if it is a ``kind`` record, else None. Cheaper than
    ``RecordDict.config_records`` and friends, which copy every record into a fresh
    type-checked view on each access."""
    rec = records[name] if name in records else None
    return rec if isinstance(rec, kind) else None


def ring_array(vec: np.ndarray) -> Array:
    """The masked ring vector as an Array of raw bytes (see :data:`RING_STYPE`)."""
    return Array(dtype=vec.dtype.str, shape=(int(vec.size),), stype=RING_STYPE, data=vec.tobytes())


def ring_vector(arr: Array, length: int, dtype: np.dtype) -> np.ndarray:
    """Read-only view of a :func:`ring_array`; ValueError unless it is exactly ``length``
    elements of ``dtype``."""
    dtype = np.dtype(dtype)
    try:
        ok = (arr.stype == RING_STYPE and arr.dtype == dtype.str and tuple(arr.shape) == (length,)
              and isinstance(arr.data, bytes) and len(arr.data) == length * dtype.itemsize)
    except (AttributeError, TypeError):
        ok = False
    if not ok:
        raise ValueError("masked vector of the wrong stype, type or shape")
    return np.frombuffer(arr.data, dtype=dtype)


def majority(n: int) -> int:
    return n // 2 + 1


def default_neighbours(n: int) -> int:
    """Complete graph up to 12 clients, else ceil(log2 n) (Bell et al.: O(log n)); more
    neighbours tolerate more dropouts (f = ceil((k + 1) / 2) - 1) at the price of k masks each."""
    return n - 1 if n <= 12 else math.ceil(math.log2(n))


def resolve_k(n: int, requested: int | None) -> int:
    if n < 2:
        return 0
    k = default_neighbours(n) if not requested else int(requested)
    k = max(1, min(k, n - 1))
    if k % 2 and n % 2:  # Harary graph with odd k needs even n: round up (or down at n - 1)
        k = k + 1 if k + 1 <= n - 1 else k - 1
    return max(k, 1)


def thresholds(n: int, k: int, t_request: int = 0, min_fraction: float = 0.0) -> tuple[int, int]:
    """(t, t_local) for n clients on H(k, n); ``t_request`` and ``min_fraction`` only raise them."""
    t_local = (k + 1) // 2 + 1
    if min_fraction > 0:
        t_local = max(t_local, math.ceil(min_fraction * (k + 1)))
    t_local = min(t_local, k + 1)
    f = k + 1 - t_local
    t = max(majority(n), n - f, int(t_request or 0))
    if min_fraction > 0:
        t = max(t, math.ceil(min_fraction * n))
    return min(t, n), t_local


def nodes_digest(nodes: list[int]) -> bytes:
    return hashlib.sha256(PROTOCOL_ID + b"/nodes/" + struct.pack(f"<{len(nodes)}Q", *nodes)).digest()


def harary_graph(nodes: list[int], k: int, sid: bytes) -> dict[int, set[int]]:
    """Cached :func:`_build_harary` (read-only neighbour sets)."""
    return _harary(tuple(sorted(nodes)), k, sid)


@lru_cache(maxsize=64)
def _harary(nodes: tuple[int, ...], k: int, sid: bytes) -> dict[int, frozenset[int]]:
    return {v: frozenset(w) for v, w in _build_harary(list(nodes), k, sid).items()}


def _build_harary(nodes: list[int], k: int, sid: bytes) -> dict[int, set[int]]:
    """H(k, n) on a permutation of ``nodes`` seeded by the session id: k-connected, k-regular
    (one node has degree k + 1 only when k and n are both odd, which :func:`resolve_k` avoids)."""
    nodes = sorted(nodes)
    n = len(nodes)
    graph: dict[int, set[int]] = {v: set() for v in nodes}
    if n < 2 or k < 1:
        return graph
    seed = int.from_bytes(hashlib.sha256(PROTOCOL_ID + b"/graph/" + sid + nodes_digest(nodes)).digest(), "big")
    order = list(nodes)
    random.Random(seed).shuffle(order)
    for i in range(n):
        for off in range(1, k // 2 + 1):
            a, b = order[i], order[(i + off) % n]
            graph[a].add(b)
            graph[b].add(a)
        if k % 2:
            a, b = order[i], order[(i + n // 2) % n]
            if a != b:
                graph[a].add(b)
                graph[b].add(a)
    return graph


def connected(graph: dict[int, set[int]], subset: set[int]) -> bool:
    if not subset:
        return False
    start = next(iter(subset))
    seen, todo = {start}, [start]
    while todo:
        v = todo.pop()
        for w in graph.get(v, ()):
            if w in subset and w not in seen:
                seen.add(w)
                todo.append(w)
    return seen == subset


def ad_bytes(sid: bytes, rnd: int, node: int, digest: bytes, k: int, t: int, t_local: int,
             pk_c: bytes, pk_s: bytes, commit: bytes) -> bytes:
    """What an owner signs in its key advertisement."""
    return (PROTOCOL_ID + b"/ad/" + sid + struct.pack("<qQqqq", rnd, node, k, t, t_local)
            + digest + pk_c + pk_s + commit)


def survivors_bytes(sid: bytes, rnd: int, survivors: list[int]) -> bytes:
    """What an owner signs in the consistency stage: the exact survivor set of the round."""
    s = sorted(survivors)
    return PROTOCOL_ID + b"/survivors/" + sid + struct.pack(f"<q{len(s)}Q", rnd, *s)
