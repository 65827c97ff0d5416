"""Mask generation: AES-256-CTR keystream keyed with the full 256-bit seed, read as ring elements.

AES-CTR runs on the CPU's AES instructions (about twice ChaCha20's throughput here). Unlike flwr's ``pseudo_rand_gen`` (which XOR-folds the key into a 32-bit Mersenne-Twister
seed, flwr issue #7522) every bit of the seed keys the stream, and the output is uniform
over Z_{2^b} because 2^b divides the word size: no rejection sampling needed.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_NONCE = bytes(16)
"""Each seed keys exactly one stream (seeds are fresh or HKDF-derived per round), so a fixed nonce is safe."""


def ring_dtype(bits: int) -> np.dtype:
    if not 2 <= bits <= 64:
        raise ValueError(f"ring size must be 2..64 bits, got {bits}")
    return np.dtype("<u4") if bits <= 32 else np.dtype("<u8")


def reduce(vec: np.ndarray, bits: int) -> np.ndarray:
    """Reduce in place mod 2^bits (a no-op for the native 32/64-bit rings)."""
    if bits not in (32, 64):
        vec &= vec.dtype.type((1 << bits) - 1)
    return vec


_zeros = memoryview(b"")


def _zero_input(nbytes: int) -> memoryview:
    """Shared all-zero plaintext (keystream = AES-CTR(zeros)); grown on demand, never written."""
    global _zeros
    if len(_zeros) < nbytes:
        _zeros = memoryview(bytes(max(nbytes, 2 * len(_zeros))))
    return _zeros[:nbytes]


def keystream_into(seed: bytes, out: memoryview | bytearray) -> None:
    if len(seed) != 32:
        raise ValueError("mask seed must be 32 bytes")
    enc = Cipher(algorithms.AES(seed), modes.CTR(_NONCE)).encryptor()
    enc.update_into(_zero_input(len(out)), out)


def keystream(seed: bytes, nbytes: int) -> bytearray:
    out = bytearray(nbytes)
    keystream_into(seed, out)
    return out


def mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """Uniform vector over Z_{2^bits} of ``length`` elements derived from ``seed``."""
    dt = ring_dtype(bits)
    vec = np.frombuffer(keystream(seed, length * dt.itemsize), dtype=dt)
    return reduce(vec, bits)


_local = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
    """Per-thread reusable buffer: avoids page-faulting a fresh multi-MB array per mask."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _local.buf = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes]


def add_mask(acc: np.ndarray, seed: bytes, bits: int, sign: int = 1) -> None:
    """acc += sign * mask(seed) in the ring, in place."""
    m = _scratch(acc.nbytes).view(acc.dtype)
    keystream_into(seed, memoryview(m).cast("B"))
    reduce(m, bits)
    if sign >= 0:
        np.add(acc, m, out=acc)
    else:
        np.subtract(acc, m, out=acc)
    reduce(acc, bits)


_WORKERS = min(4, os.cpu_count() or 1)
_pool = None
_pool_lock = threading.Lock()


def _executor():
    """One process-wide pool (created on first use): a pool per call costs more than it saves."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="secagg-mask")
        return _pool


def _buffers(count: int, like: np.ndarray) -> list[np.ndarray]:
    """Per-thread reusable mask buffers: a fresh multi-MB array per mask page-faults on every use."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None or len(bufs) < count or bufs[0].nbytes < like.nbytes:
        bufs = _local.bufs = [np.empty(like.nbytes, dtype=np.uint8) for _ in range(count)]
    return [b[: like.nbytes].view(like.dtype) for b in bufs[:count]]


def add_masks(acc: np.ndarray, seeds: list[tuple[bytes, int]], bits: int) -> None:
    """acc += sum(sign * mask(seed)) in place. Large vectors: the keystreams are expanded on a
    thread pool (the cipher runs outside the GIL) while this thread adds them, in order, a
    batch of two per worker at a time; a client's k + 1 masks are enough to gain from it."""
    if len(seeds) < 3 or _WORKERS < 2 or acc.nbytes < (1 << 18):  # small batches: threads cost more
        for seed, sign in seeds:
            add_mask(acc, seed, bits, sign)
        return

    def expand(job: tuple[bytes, np.ndarray]) -> np.ndarray:
        seed, m = job
        keystream_into(seed, memoryview(m).cast("B"))
        return m

    pool = _executor()
    bufs = _buffers(min(len(seeds), 2 * _WORKERS), acc)
    for start in range(0, len(seeds), len(bufs)):
        chunk = seeds[start: start + len(bufs)]
        for (_, sign), m in zip(chunk, pool.map(expand, [(seed, b) for (seed, _), b in zip(chunk, bufs)])):
            reduce(m, bits)
            (np.add if sign >= 0 else np.subtract)(acc, m, out=acc)
    reduce(acc, bits)
