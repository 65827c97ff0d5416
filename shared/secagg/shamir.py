"""Vectorized Shamir sharing of 32-byte secrets over the prime field GF(2^31 - 1).

A 32-byte secret is cut into 9 limbs of 30 bits (270 >= 256 bits), each shared with its own
random polynomial of degree ``threshold - 1``: sharing is information-theoretically hiding
per limb, so below the threshold the shares say nothing about the secret. With a 31-bit
prime every product of two field elements fits in a uint64, so share generation is a numpy
Horner scheme over a (shares, secrets, limbs) array (three vector operations per
coefficient), and reconstruction is one Lagrange-at-zero combination for many secrets at
once (:func:`combine_many`); the weights depend only on the holder indices and are cached.

A share on the wire is ``index (2 bytes LE) || 9 limbs (4 bytes LE each)``.
"""

from __future__ import annotations

import os
import struct
from functools import lru_cache

import numpy as np

P = (1 << 31) - 1
LIMBS = 9
LIMB_BITS = 30
SECRET_LEN = 32
SHARE_LEN = 2 + 4 * LIMBS
_P = np.uint64(P)
_LIMB_MASK = (1 << LIMB_BITS) - 1


def _to_limbs(secret: bytes) -> np.ndarray:
    v = int.from_bytes(secret, "little")
    return np.array([(v >> (LIMB_BITS * i)) & _LIMB_MASK for i in range(LIMBS)], dtype=np.uint64)


def _from_limbs(limbs) -> bytes:
    v = 0
    for i, x in enumerate(limbs):
        x = int(x)
        if x > _LIMB_MASK:
            raise ValueError("reconstructed limb out of range: inconsistent shares")
        v |= x << (LIMB_BITS * i)
    if v >= 1 << (8 * SECRET_LEN):
        raise ValueError("reconstructed secret out of range: inconsistent shares")
    return v.to_bytes(SECRET_LEN, "little")


def _random_field(shape: tuple[int, ...]) -> np.ndarray:
    raw = np.frombuffer(os.urandom(8 * int(np.prod(shape))), dtype="<u8").reshape(shape)
    return raw % _P  # bias < 2^-33


def split_many(secrets: list[bytes], threshold: int, num: int) -> list[list[bytes]]:
    """Shares of each secret: ``out[s][i]`` is share ``i + 1`` of secret ``s``."""
    if not 1 <= threshold <= num or num > 0xFFFF:
        raise ValueError(f"invalid threshold {threshold} for {num} shares")
    if any(len(s) != SECRET_LEN for s in secrets):
        raise ValueError("secret must be 32 bytes")
    m = len(secrets)
    coeffs = _random_field((threshold - 1, m, LIMBS))
    xs = np.arange(1, num + 1, dtype=np.uint64)[:, None, None]
    acc = np.zeros((num, m, LIMBS), dtype=np.uint64)
    for c in coeffs[::-1]:  # Horner from the top coefficient: acc < p, x <= 2^16, so acc * x + c < 2^63
        acc *= xs
        acc += c
        acc %= _P
    acc *= xs
    acc += np.stack([_to_limbs(s) for s in secrets])[None]
    acc %= _P
    body = acc.astype("<u4")
    idx = [struct.pack("<H", i + 1) for i in range(num)]
    return [[idx[i] + body[i, s].tobytes() for i in range(num)] for s in range(m)]


def split(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Return ``num`` shares with indices 1..num; any ``threshold`` of them recover ``secret``."""
    return split_many([secret], threshold, num)[0]


@lru_cache(maxsize=1024)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % P
                den = den * (xj - xi) % P
        out.append(num * pow(den, P - 2, P) % P)
    return tuple(out)


def _parse(shares: list[bytes]) -> dict[int, np.ndarray]:
    uniq: dict[int, np.ndarray] = {}
    for s in shares:
        if not isinstance(s, bytes) or len(s) != SHARE_LEN:
            raise ValueError("malformed share")
        idx = struct.unpack("<H", s[:2])[0]
        limbs = np.frombuffer(s, dtype="<u4", offset=2).astype(np.uint64)
        if idx == 0 or np.any(limbs >= _P):
            raise ValueError("malformed share")
        uniq.setdefault(idx, limbs)
    return uniq


def combine(shares: list[bytes], threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares (the first ``threshold`` distinct indices)."""
    out = combine_many([shares], [threshold])[0]
    if out is None:
        uniq = _parse(shares)
        if len(uniq) < threshold:
            raise ValueError(f"need {threshold} shares, have {len(uniq)}")
        raise ValueError("reconstructed secret out of range: inconsistent shares")
    return out


def combine_many(shares: list[list[bytes]], thresholds: list[int]) -> list[bytes | None]:
    """Recover many secrets at once (one vectorized Lagrange pass over all of them).

    ``shares[s]`` are the shares of secret ``s`` and ``thresholds[s]`` its threshold; the first
    ``thresholds[s]`` distinct indices are used. A secret with too few or malformed shares, or
    whose shares are inconsistent, comes back as None (the caller may try other subsets).
    """
    m = len(shares)
    tmax = max(1, max(thresholds, default=1))
    S = np.zeros((m, tmax, LIMBS), dtype=np.uint64)
    W = np.zeros((m, tmax, 1), dtype=np.uint64)
    ok = [False] * m
    for s, (sh, t) in enumerate(zip(shares, thresholds)):
        try:
            uniq = _parse(sh)
        except ValueError:
            continue
        if t < 1 or len(uniq) < t:
            continue
        xs = tuple(sorted(uniq)[:t])
        W[s, :t, 0] = _lagrange_at_zero(xs)
        S[s, :t] = np.stack([uniq[x] for x in xs])
        ok[s] = True
    S *= W  # < 2^62
    S %= _P
    acc = S.sum(axis=1) % _P if tmax < (1 << 32) else None  # tmax * 2^31 < 2^64
    out: list[bytes | None] = []
    for s in range(m):
        try:
            out.append(_from_limbs(acc[s]) if ok[s] else None)
        except ValueError:
            out.append(None)
    return out
