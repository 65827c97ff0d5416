"""Fixed-point encoding of weighted updates into the ring Z_{2^b}, with overflow detection.

Each client encodes ``round(w * delta * scale)`` (two's complement in the ring) followed by
its integer weight ``w``. The format is fixed by the server before training from public
quantities only (number of clients ``n``, max weight ``W``, clip range ``C`` on
``|delta|_inf``) so that the sum of ``n`` in-range contributions can never wrap:
``n * W * C * scale <= 2^(b-2)`` (a spare bit of headroom covers rounding, so
n honest clients never overflow; clients clip to C and cap their weight at W). A client whose update or weight is outside the declared
range raises :class:`QuantizationOverflow` instead of wrapping silently.

Error bound: each client's rounding error is at most 1/2 unit, so after dividing by the total
weight ``S`` every coordinate of the mean delta is within ``n / (2 * scale * S)`` of exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .masks import reduce, ring_dtype

DEFAULT_MAX_WEIGHT = 1 << 20
DEFAULT_CLIP = 64.0
_RESOLUTION_BITS = 24
"""Per unit of weight, resolve the clip range to float32-mantissa precision."""


class QuantizationOverflow(OverflowError):
    """An update or weight outside the declared range: encoding it would wrap the ring."""


@dataclass(frozen=True)
class RingFormat:
    bits: int
    scale: float
    max_weight: int
    clip: float

    @property
    def dtype(self) -> np.dtype:
        return ring_dtype(self.bits)

    def error_bound(self, n_contributors: int, total_weight: int) -> float:
        """Max abs error per coordinate of the weighted-mean delta."""
        if total_weight <= 0:
            return 0.0
        return n_contributors / (2.0 * self.scale * total_weight)


def choose_format(
    n: int,
    *,
    max_weight: int = DEFAULT_MAX_WEIGHT,
    clip: float = DEFAULT_CLIP,
    bits: int | None = None,
) -> RingFormat:
    """Pick ring size and scale so ``n`` contributions of at most ``max_weight * clip`` cannot wrap.

    Auto ``bits``: 32 when it leaves 24 bits of resolution per unit weight, else 64 (the usual
    case, because ``max_weight`` must be a conservative cap on example counts).
    """
    if n < 1 or max_weight < 1 or not (clip > 0 and math.isfinite(clip)):
        raise ValueError("need n >= 1, max_weight >= 1 and a finite clip > 0")
    span = n * max_weight
    if bits is None:
        bits = 32 if 1 + _RESOLUTION_BITS + math.ceil(math.log2(span)) <= 32 else 64
    ring_dtype(bits)
    scale = 2.0 ** math.floor(math.log2(2.0 ** (bits - 2) / (span * clip)))
    if scale * clip < 2.0**10:
        raise ValueError(
            f"a {bits}-bit ring leaves under 10 bits of resolution for {n} clients, "
            f"max weight {max_weight}, clip {clip}; use more bits or tighter bounds"
        )
    return RingFormat(bits=bits, scale=scale, max_weight=int(max_weight), clip=float(clip))


def encode(delta: np.ndarray, weight: int, fmt: RingFormat) -> np.ndarray:
    """Ring vector ``[round(weight * delta * scale)..., weight]``; raises on out-of-range input
    (:func:`encode_clipped` is what an honest client sends: it clips instead of raising)."""
    if isinstance(weight, bool) or int(weight) != weight or not 0 <= weight <= fmt.max_weight:
        raise QuantizationOverflow(f"weight {weight} outside [0, {fmt.max_weight}]")
    weight = int(weight)
    flat = np.asarray(delta).reshape(-1)
    out = np.empty(flat.size + 1, dtype=fmt.dtype)
    out[-1] = weight
    if weight == 0 or flat.size == 0:
        out[:-1] = 0
        return out
    lo, hi = float(flat.min()), float(flat.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise QuantizationOverflow("update contains NaN or inf")
    amax = max(-lo, hi)
    if amax > fmt.clip:
        raise QuantizationOverflow(f"|delta|_inf = {amax:.6g} exceeds the declared bound {fmt.clip:.6g}")
    vals = np.multiply(flat, weight * fmt.scale, dtype=np.float64)
    np.rint(vals, out=vals)
    np.copyto(out[:-1].view(_signed_word(fmt, weight * fmt.scale * fmt.clip)), vals, casting="unsafe")
    return reduce(out, fmt.bits)


def _signed_word(fmt: RingFormat, lim: float) -> type:
    """The signed integer of the ring's word width. Values within +-lim <= 2^(bits-2) (the
    format's headroom) cast to it exactly, and their two's-complement bits are the ring
    elements; a format without that headroom is refused rather than wrapped."""
    word = np.int64 if fmt.dtype.itemsize == 8 else np.int32
    if lim >= 2.0 ** (min(fmt.bits, 8 * fmt.dtype.itemsize) - 1):
        raise ValueError(f"ring format leaves no headroom: values up to {lim:.6g} in a {fmt.bits}-bit ring")
    return word


@dataclass(frozen=True)
class Pieces:
    """An update given as float64 pieces (consumed in order, modified in place) that
    concatenate to ``size`` values: a client encodes tensor by tensor through one
    cache-sized buffer instead of building the whole float64 delta first."""

    parts: Iterable[np.ndarray]
    size: int


def encode_clipped(delta: np.ndarray | Pieces, weight: int, fmt: RingFormat) -> np.ndarray:
    """Like :func:`encode`, but the update is clipped to the declared bound (NaN -> 0) and the
    weight capped at ``max_weight``, so an honest client's vector is always in range and n of
    them never overflow the ring. Consumes ``delta`` (float64, modified in place)."""
    weight = max(0, min(int(weight), fmt.max_weight))
    if isinstance(delta, Pieces):
        pieces, size = delta.parts, int(delta.size)
    else:
        pieces, size = [delta], delta.size
    out = np.empty(size + 1, dtype=fmt.dtype)
    out[-1] = weight
    if weight == 0 or size == 0:
        out[:-1] = 0
        return out
    f = weight * fmt.scale
    lim = math.floor(f * fmt.clip)
    signed = out[:-1].view(_signed_word(fmt, lim))
    pos = 0
    for flat in pieces:
        flat = flat.reshape(-1)
        if pos + flat.size > size:
            raise ValueError(f"update has more than the declared {size} values")
        with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are expected here: cleaned below
            np.multiply(flat, f, out=flat)
            finite = math.isfinite(float(flat.sum()))
        if not finite:
            np.nan_to_num(flat, copy=False, nan=0.0, posinf=lim, neginf=-lim)
        np.clip(flat, -lim, lim, out=flat)
        np.rint(flat, out=flat)
        np.copyto(signed[pos: pos + flat.size], flat, casting="unsafe")
        pos += flat.size
    if pos != size:
        raise ValueError(f"update has {pos} values, declared {size}")
    return reduce(out, fmt.bits)


def to_signed(vec: np.ndarray, bits: int) -> np.ndarray:
    """Two's-complement interpretation of ring elements as int64."""
    if bits == 64:
        return vec.view(np.int64)
    if bits == 32:
        return vec.view(np.int32).astype(np.int64)
    s = vec.astype(np.int64)
    s[s >= (1 << (bits - 1))] -= 1 << bits
    return s


def decode_sum(ring_sum: np.ndarray, fmt: RingFormat, n_contributors: int) -> tuple[np.ndarray, int]:
    """Return (sum of weight*delta as float64, total weight) from the unmasked ring sum.

    Raises :class:`QuantizationOverflow` if the total weight is impossible for
    ``n_contributors`` in-range inputs, which means some input was out of range or corrupt.
    """
    signed = to_signed(reduce(ring_sum.copy(), fmt.bits), fmt.bits)
    total_weight = int(signed[-1])
    if not 0 <= total_weight <= n_contributors * fmt.max_weight:
        raise QuantizationOverflow(f"unmasked total weight {total_weight} is out of range")
    return signed[:-1].astype(np.float64) / fmt.scale, total_weight
