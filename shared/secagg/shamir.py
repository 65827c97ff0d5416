"""Shamir sharing of 32-byte secrets on top of pycryptodome's GF(2^128) implementation.

pycryptodome shares 16-byte secrets, so each 32-byte secret is split as two independent
16-byte halves with the same share indices. Unlike flwr's helper we do not pad (the
secrets are always exactly 32 bytes), which saves a third of the work. A share on the wire
is ``index (2 bytes LE) || share(half 1) || share(half 2)``.
"""

from __future__ import annotations

import struct

from Crypto.Protocol.SecretSharing import Shamir

SECRET_LEN = 32
SHARE_LEN = 2 + 32


def split(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Return ``num`` shares with indices 1..num; any ``threshold`` of them recover ``secret``."""
    if len(secret) != SECRET_LEN:
        raise ValueError("secret must be 32 bytes")
    if not 1 <= threshold <= num or num > 0xFFFF:
        raise ValueError(f"invalid threshold {threshold} for {num} shares")
    lo = Shamir.split(threshold, num, secret[:16], ssss=False)
    hi = Shamir.split(threshold, num, secret[16:], ssss=False)
    return [struct.pack("<H", i) + a + b for (i, a), (j, b) in zip(lo, hi, strict=True) if i == j]


def combine(shares: list[bytes], threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares (extra ones are ignored)."""
    uniq: dict[int, bytes] = {}
    for s in shares:
        if len(s) != SHARE_LEN:
            raise ValueError("malformed share")
        uniq.setdefault(struct.unpack("<H", s[:2])[0], s)
    if len(uniq) < threshold:
        raise ValueError(f"need {threshold} shares, have {len(uniq)}")
    chosen = [(i, s) for i, s in sorted(uniq.items())][:threshold]
    lo = Shamir.combine([(i, s[2:18]) for i, s in chosen], ssss=False)
    hi = Shamir.combine([(i, s[18:34]) for i, s in chosen], ssss=False)
    return lo + hi
