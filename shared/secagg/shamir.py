"""Vectorized Shamir sharing of 32-byte secrets over the prime field GF(2^61 - 1).

A 32-byte secret is cut into 5 limbs of 60 bits (300 >= 256 bits), each shared with its own
random polynomial of degree ``threshold - 1``: sharing is information-theoretically hiding per
limb, so below the threshold the shares say nothing about the secret. Share generation
evaluates all limbs of all polynomials at all points with numpy (Horner, one multiply-add
per coefficient over a (num, limbs) array), and reconstruction is one Lagrange-at-zero
combination whose weights depend only on the holder indices, so :func:`combine_many`
recovers many secrets held by the same holders for the price of one set of weights.

Arithmetic mod p = 2^61 - 1 in uint64 cannot overflow: operands are < 2^61, and products are
formed with Python ints only for the O(t^2) weights; the vector work splits each product
into 32-bit halves (``_mulmod``).

A share on the wire is ``index (2 bytes LE) || 5 limbs (8 bytes LE each)``.
"""

from __future__ import annotations

import os
import struct
from functools import lru_cache

import numpy as np

P = (1 << 61) - 1
LIMBS = 5
LIMB_BITS = 60
SECRET_LEN = 32
SHARE_LEN = 2 + 8 * LIMBS
_P = np.uint64(P)
_M32 = np.uint64(0xFFFFFFFF)


def _mod(x: np.ndarray) -> np.ndarray:
    """x mod p for x < 2^64 (Mersenne reduction, twice to be safe)."""
    x = (x & _P) + (x >> np.uint64(61))
    x = (x & _P) + (x >> np.uint64(61))
    return np.where(x >= _P, x - _P, x)


def _mulmod(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """(a * b) mod p for a, b < p, elementwise, without 128-bit integers."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    a_lo, a_hi = a & _M32, a >> np.uint64(32)
    b_lo, b_hi = b & _M32, b >> np.uint64(32)
    # a*b = hh*2^64 + (hl+lh)*2^32 + ll ; 2^61 = 1 (mod p) so 2^64 = 8 and 2^32*x splits likewise
    ll = a_lo * b_lo                      # < 2^64
    mid = a_lo * b_hi + a_hi * b_lo       # < 2^62 (hi parts < 2^29)
    hh = a_hi * b_hi                      # < 2^58
    r = _mod(ll)
    # mid * 2^32 = (mid_hi * 2^61 + mid_lo * 2^32) with mid_lo < 2^29 -> < 2^61 after split
    mid_lo, mid_hi = mid & np.uint64((1 << 29) - 1), mid >> np.uint64(29)
    r = _mod(r + (mid_lo << np.uint64(32)))
    r = _mod(r + _mod(mid_hi))
    r = _mod(r + _mod(hh << np.uint64(3)))
    return r


def _to_limbs(secret: bytes) -> np.ndarray:
    v = int.from_bytes(secret, "little")
    return np.array([(v >> (LIMB_BITS * i)) & ((1 << LIMB_BITS) - 1) for i in range(LIMBS)], dtype=np.uint64)


def _from_limbs(limbs) -> bytes:
    v = 0
    for i, x in enumerate(limbs):
        x = int(x)
        if x >= 1 << LIMB_BITS:
            raise ValueError("reconstructed limb out of range: inconsistent shares")
        v |= x << (LIMB_BITS * i)
    if v >= 1 << (8 * SECRET_LEN):
        raise ValueError("reconstructed secret out of range: inconsistent shares")
    return v.to_bytes(SECRET_LEN, "little")


def _random_field(shape: tuple[int, ...]) -> np.ndarray:
    raw = np.frombuffer(os.urandom(8 * int(np.prod(shape))), dtype="<u8").reshape(shape)
    return _mod(raw & np.uint64((1 << 63) - 1))  # bias < 2^-60


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
    for c in coeffs[::-1]:                       # Horner from the top coefficient
        acc = _mod(_mulmod(acc, xs) + c[None])
    acc = _mod(_mulmod(acc, xs) + np.stack([_to_limbs(s) for s in secrets])[None])
    body = acc.astype("<u8")
    return [[struct.pack("<H", i + 1) + body[i, s].tobytes() for i in range(num)] for s in range(m)]


def split(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Return ``num`` shares with indices 1..num; any ``threshold`` of them recover ``secret``."""
    return split_many([secret], threshold, num)[0]


@lru_cache(maxsize=256)
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
        limbs = np.frombuffer(s[2:], dtype="<u8").astype(np.uint64)
        if idx == 0 or np.any(limbs >= _P):
            raise ValueError("malformed share")
        uniq.setdefault(idx, limbs)
    return uniq


def combine(shares: list[bytes], threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares (the first ``threshold`` distinct indices)."""
    uniq = _parse(shares)
    if len(uniq) < threshold:
        raise ValueError(f"need {threshold} shares, have {len(uniq)}")
    xs = tuple(sorted(uniq)[:threshold])
    lam = _lagrange_at_zero(xs)
    acc = np.zeros(LIMBS, dtype=np.uint64)
    for x, w in zip(xs, lam):
        acc = _mod(acc + _mulmod(uniq[x], w))
    return _from_limbs(acc)


def combine_many(shares: list[list[bytes]], thresholds: list[int]) -> list[bytes | None]:
    """Recover many secrets at once (one vectorized Lagrange pass over all of them).

    ``shares[s]`` are the shares of secret ``s`` and ``thresholds[s]`` its threshold; the first
    ``thresholds[s]`` distinct indices are used. A secret with too few or malformed shares
    comes back as None (the caller may then try other subsets with :func:`combine`).
    """
    m = len(shares)
    tmax = max(thresholds, default=0)
    S = np.zeros((m, max(tmax, 1), LIMBS), dtype=np.uint64)
    W = np.zeros((m, max(tmax, 1)), dtype=np.uint64)
    ok = [False] * m
    for s, (sh, t) in enumerate(zip(shares, thresholds)):
        try:
            uniq = _parse(sh)
        except ValueError:
            continue
        if t < 1 or len(uniq) < t:
            continue
        xs = tuple(sorted(uniq)[:t])
        W[s, :t] = _lagrange_at_zero(xs)
        S[s, :t] = np.stack([uniq[x] for x in xs])
        ok[s] = True
    acc = np.zeros((m, LIMBS), dtype=np.uint64)
    for i in range(max(tmax, 1)):
        acc = _mod(acc + _mulmod(S[:, i], W[:, i, None]))
    out: list[bytes | None] = []
    for s in range(m):
        try:
            out.append(_from_limbs(acc[s]) if ok[s] else None)
        except ValueError:
            out.append(None)
    return out
