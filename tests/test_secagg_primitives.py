"""Unit tests for the secure-aggregation primitives: masks, share encryption, Shamir, quantization."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
from scipy import stats

from shared.secagg import crypto, masks, shamir
from shared.secagg.quantize import QuantizationOverflow, choose_format, decode_sum, encode


def chi2_uniform_pvalue(vec: np.ndarray, bits: int, bins: int = 256) -> float:
    """Chi-square p-value of ``vec`` over Z_{2^bits}, binned on the top and the bottom 8 bits."""
    v = vec.astype(np.uint64)
    top = (v >> np.uint64(bits - 8)) & np.uint64(0xFF)
    low = v & np.uint64(0xFF)
    pvals = [stats.chisquare(np.bincount(x.astype(np.int64), minlength=bins)).pvalue for x in (top, low)]
    return min(pvals)


def test_mask_is_uniform_and_chi2_detects_nonuniform():
    m = masks.mask(os.urandom(32), 20_000, 64)
    assert chi2_uniform_pvalue(m, 64) > 1e-4
    skewed = np.random.default_rng(0).integers(0, 1 << 62, 20_000, dtype=np.uint64)
    assert chi2_uniform_pvalue(skewed, 64) < 1e-10


def test_masks_use_the_full_256_bit_key_unlike_flwr_pseudo_rand_gen():
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    k1 = bytearray(os.urandom(32))
    k2 = bytearray(k1)
    # Flip the same bits in words 0 and 1: the 32-bit XOR fold of the key is unchanged.
    for word in (0, 1):
        x = struct.unpack_from("<I", k2, 4 * word)[0] ^ 0xDEADBEEF
        struct.pack_into("<I", k2, 4 * word, x)
    k1, k2 = bytes(k1), bytes(k2)
    assert k1 != k2
    f1, f2 = (pseudo_rand_gen(k, 1 << 32, [(1000,)])[0] for k in (k1, k2))
    assert np.array_equal(f1, f2), "flwr's generator folds the key to 32 bits"
    o1, o2 = masks.mask(k1, 1000, 64), masks.mask(k2, 1000, 64)
    assert not np.array_equal(o1, o2)
    assert np.mean(o1 == o2) < 0.01


def test_every_bit_of_the_seed_shapes_the_mask():
    """Key half and counter half alike: flipping any one bit changes the whole stream."""
    seed = os.urandom(32)
    base = masks.mask(seed, 1000, 64)
    for bit in (0, 127, 128, 255):
        flipped = bytearray(seed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert np.mean(masks.mask(bytes(flipped), 1000, 64) == base) < 0.01, bit


@pytest.mark.parametrize("workers", [1, 3])
def test_ranges_continue_the_counter_across_its_wrap(monkeypatch, workers):
    """A counter half near 2^128 wraps mid-vector: each thread's range starts where the whole
    stream is at that point, as OpenSSL increments the whole 16-byte block."""
    monkeypatch.setattr(masks, "_WORKERS", workers)
    monkeypatch.setattr(masks, "_pool", None)
    seed = os.urandom(16) + b"\xff" * 15 + b"\xf0"  # wraps after 16 blocks
    length = 140_000
    got = np.zeros(length, dtype=np.uint32)
    masks.add_masks(got, [(seed, 1)] * 3, 32)  # three seeds: the threaded path
    assert np.array_equal(got, masks.mask(seed, length, 32) * np.uint32(3))


def test_mask_reduction_for_small_rings():
    m = masks.mask(os.urandom(32), 5000, 20)
    assert m.dtype == np.uint32 and int(m.max()) < (1 << 20)
    acc = np.zeros(5000, dtype=np.uint32)
    seed = os.urandom(32)
    masks.add_mask(acc, seed, 20, +1)
    masks.add_mask(acc, seed, 20, -1)
    assert not acc.any()


def _ct(**over):
    key = os.urandom(32)
    args = dict(sid=b"s" * 16, rnd=3, src=11, dst=12)
    ct = crypto.encrypt_share(key, b"share-bytes", **args)
    return key, ct, args


def test_share_roundtrip():
    key, ct, args = _ct()
    assert crypto.decrypt_share(key, ct, **args) == b"share-bytes"


@pytest.mark.parametrize("field,value", [("sid", b"t" * 16), ("rnd", 4), ("src", 13), ("dst", 11)])
def test_share_bound_to_session_round_sender_receiver(field, value):
    key, ct, args = _ct()
    with pytest.raises(crypto.ShareDecryptionError):
        crypto.decrypt_share(key, ct, **(args | {field: value}))


def test_tampered_share_rejected():
    key, ct, args = _ct()
    for pos in (0, 12, len(ct) - 1):
        bad = bytearray(ct)
        bad[pos] ^= 1
        with pytest.raises(crypto.ShareDecryptionError):
            crypto.decrypt_share(key, bytes(bad), **args)


def test_key_agreement_and_derivation_symmetric():
    a, b = crypto.generate_keypair(), crypto.generate_keypair()
    sab, sba = crypto.agree(a.private, b.public), crypto.agree(b.private, a.public)
    assert sab == sba
    assert crypto.pair_mask_seed(sab, b"x" * 16, 1, 5, 9) == crypto.pair_mask_seed(sba, b"x" * 16, 1, 9, 5)
    assert crypto.pair_mask_seed(sab, b"x" * 16, 1, 5, 9) != crypto.pair_mask_seed(sab, b"x" * 16, 2, 5, 9)
    assert crypto.public_from_private(a.private) == a.public


def test_shamir_threshold():
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, 5)
    assert shamir.combine(shares[1:4], 3) == secret
    assert shamir.combine([shares[4], shares[0], shares[2]], 3) == secret
    try:  # below the threshold: a wrong secret, or a reconstruction that is visibly out of range
        assert shamir.combine(shares[:2] + shares[:2], 2) != secret
    except ValueError:
        pass
    with pytest.raises(ValueError):
        shamir.combine(shares[:2], 3)


def test_shamir_vectorized_every_size_and_hiding_below_threshold():
    import random

    rng = random.Random(0)
    for num in (1, 2, 3, 5, 9, 17, 64, 101):
        for t in {t for t in (1, 2, num // 2 + 1, num) if t <= num}:
            secrets = [os.urandom(32) for _ in range(3)]
            shares = shamir.split_many(secrets, t, num)
            for sec, sh in zip(secrets, shares):
                pick = rng.sample(sh, t)
                assert shamir.combine(pick, t) == sec
                assert shamir.combine(pick + rng.sample(sh, min(num, t + 1) - t), t) == sec
    # t - 1 shares are consistent with every secret: the missing share can be chosen to hit any target
    s1, s2 = os.urandom(32), os.urandom(32)
    sh = shamir.split(s1, 3, 3)
    p = shamir.P
    import struct as _st

    # interpolate the degree-2 polynomial through shares 1, 2 and (0, s2) per limb: share 3 that yields s2
    l1 = np.frombuffer(sh[0][2:], "<u4").astype(object)
    l2 = np.frombuffer(sh[1][2:], "<u4").astype(object)
    l0 = shamir._to_limbs(s2).astype(object)
    def at3(y0, y1, y2):  # Lagrange through (0, y0), (1, y1), (2, y2), evaluated at 3
        return (y0 * 1 + y1 * (-3) + y2 * 3) % p
    forged = _st.pack("<H", 3) + b"".join(int(at3(a, b, c)).to_bytes(4, "little") for a, b, c in zip(l0, l1, l2))
    assert shamir.combine([sh[0], sh[1], forged], 3) == s2


def test_quantize_roundtrip_within_bound():
    rng = np.random.default_rng(1)
    fmt = choose_format(3, max_weight=1000, clip=1.0)
    deltas = [rng.uniform(-1, 1, 1000) for _ in range(3)]
    weights = [10, 1000, 0]
    acc = np.zeros(1001, dtype=fmt.dtype)
    for d, w in zip(deltas, weights):
        acc += encode(d, w, fmt)
    wsum, total = decode_sum(acc, fmt, 3)
    assert total == 1010
    exact = sum(w * d for d, w in zip(deltas, weights)) / total
    assert np.max(np.abs(wsum / total - exact)) <= fmt.error_bound(3, total) + 4 * np.finfo(float).eps


def test_quantize_picks_ring_from_clients_and_weights():
    assert choose_format(4, max_weight=8, clip=1.0).bits == 32
    assert choose_format(50, max_weight=1 << 20, clip=64.0).bits == 64
    f10, f100 = choose_format(10), choose_format(100)
    assert f100.scale < f10.scale, "more clients need more headroom"
    with pytest.raises(ValueError):
        choose_format(1000, max_weight=1 << 20, clip=64.0, bits=32)


@pytest.mark.parametrize("delta,weight", [
    (np.array([0.0, 65.0]), 1),          # beyond the clip range
    (np.array([0.0, np.nan]), 1),
    (np.array([0.0, np.inf]), 1),
    (np.array([0.0, 1.0]), (1 << 20) + 1),  # weight above the declared cap
    (np.array([0.0, 1.0]), -1),
])
def test_overflow_raises_instead_of_wrapping(delta, weight):
    with pytest.raises(QuantizationOverflow):
        encode(delta, weight, choose_format(10))


def test_decode_flags_impossible_total_weight():
    fmt = choose_format(2, max_weight=10, clip=1.0)
    acc = encode(np.ones(4) * 0.5, 10, fmt) + encode(np.ones(4) * 0.5, 10, fmt) + encode(np.ones(4), 10, fmt)
    with pytest.raises(QuantizationOverflow):
        decode_sum(acc, fmt, 2)


def test_honest_encoding_clips_and_n_worst_case_clients_never_overflow():
    from shared.secagg.quantize import encode_clipped

    for n, w, clip in [(2, 1, 1.0), (50, 1 << 14, 64.0), (100, 1 << 14, 64.0), (1000, 100, 8.0)]:
        fmt = choose_format(n, max_weight=w, clip=clip)
        worst = encode_clipped(np.array([1e30, -1e30, np.nan, np.inf, -np.inf]), 10 * w, fmt)
        assert int(worst[-1]) == w  # weight capped
        acc = np.zeros(6, dtype=fmt.dtype)
        for _ in range(min(n, 64)):
            acc += worst
        acc_n = worst.astype(object) * n  # exact sum of n worst-case honest vectors
        signed = [int(x) - (1 << fmt.bits) if int(x) >= 1 << (fmt.bits - 1) else int(x) for x in worst]
        assert all(abs(v) * n < (1 << (fmt.bits - 1)) for v in signed), (n, w, signed)
        wsum, total = decode_sum(worst * np.array(1, dtype=fmt.dtype), fmt, 1)
        assert total == w and wsum[0] == pytest.approx(w * clip, rel=1e-6) and wsum[2] == 0


def test_encoding_refuses_a_format_without_headroom_instead_of_wrapping():
    from shared.secagg.quantize import RingFormat, encode_clipped

    for bits in (32, 20):
        fmt = RingFormat(bits=bits, scale=2.0 ** (bits - 1), max_weight=1, clip=1.0)  # 1.0 * scale is the sign bit
        with pytest.raises(ValueError):
            encode_clipped(np.array([1.0, -1.0]), 1, fmt)
        with pytest.raises(ValueError):
            encode(np.array([1.0, -1.0]), 1, fmt)
    fmt = RingFormat(bits=20, scale=2.0 ** 17, max_weight=1, clip=1.0)  # 2^(bits-3): fits, reduced mod 2^20
    assert list(encode(np.array([1.0, -1.0]), 1, fmt)) == [1 << 17, (1 << 20) - (1 << 17), 1]


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("bits,length", [(64, 70_001), (32, 140_003), (20, 70_001)])
def test_add_masks_by_range_equals_whole_masks(monkeypatch, workers, bits, length):
    """Serial or cut into per-thread ranges (CTR counter started at each range's block), the
    sum equals adding each whole mask; odd lengths cover a short last range."""
    monkeypatch.setattr(masks, "_WORKERS", workers)
    monkeypatch.setattr(masks, "_pool", None)
    dt = masks.ring_dtype(bits)
    acc = masks.reduce(np.arange(length, dtype=np.uint64).astype(dt) * dt.type(0x9E3779B9), bits)
    seeds = [(os.urandom(32), 1 if i % 3 else -1) for i in range(9)]
    expected = acc.astype(object)
    for seed, sign in seeds:
        expected = expected + sign * masks.mask(seed, length, bits).astype(object)
    expected = np.array([int(x) % (1 << bits) for x in expected], dtype=dt)
    for _ in range(2):  # the second call reuses the threads' buffers
        got = acc.copy()
        masks.add_masks(got, seeds, bits)
        assert np.array_equal(got, expected)


def test_packed_lists_roundtrip_and_reject_malformed():
    from shared.secagg.protocol import pack_blobs, pack_ids, unpack_blobs, unpack_ids

    items = [b"", b"\x01" * 32, os.urandom(300)]
    assert unpack_blobs(pack_blobs(items)) == items
    assert unpack_ids(pack_ids([0, 5, (1 << 64) - 1])) == [0, 5, (1 << 64) - 1]
    for bad in (pack_blobs(items)[:-1], b"\x05", "x", [b"a"], pack_blobs([b"a"] * 4)):
        with pytest.raises(ValueError):
            unpack_blobs(bad, max_count=3)
    with pytest.raises(ValueError):
        unpack_blobs(pack_blobs([b"a" * 10]), max_len=9)
    for bad in (b"\x00" * 9, [1, 2], pack_ids(range(4))):
        with pytest.raises(ValueError):
            unpack_ids(bad, max_count=3)


def test_ring_vector_accepts_only_its_own_layout():
    from flwr.app import Array

    from shared.secagg.protocol import ring_array, ring_vector

    vec = np.arange(11, dtype=np.uint64)
    assert np.array_equal(ring_vector(ring_array(vec), 11, np.uint64), vec)
    bad = [ring_array(vec[:-1]), ring_array(vec.astype(np.uint32)), Array(vec),
           Array(dtype=vec.dtype.str, shape=(11,), stype="fedlora.secagg.ring", data=vec.tobytes()[:-1])]
    for arr in bad:
        with pytest.raises(ValueError):
            ring_vector(arr, 11, np.uint64)


def test_array_view_matches_numpy_load():
    from flwr.app import Array

    from shared.params import array_view

    for a in (np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((0, 3)), np.array(3.0),
              np.arange(6, dtype=">i4"), np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.array([True, False])):
        arr = Array(a)
        view = array_view(arr)
        assert view.dtype == arr.numpy().dtype and view.shape == a.shape and np.array_equal(view, a)


def test_remembered_signatures_never_vouch_for_other_keys_data_or_signatures():
    """identity.verify remembers valid (key, signature, data) triples within a process; the
    cache must not let a forgery through: another key, other data, a changed signature, and
    any splice of the three fields stay invalid."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from shared.secagg import identity

    a, b = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
    data = b"advertisement of round 3"
    sig = identity.sign(a, data)
    for _ in range(2):  # the second time from the cache
        assert identity.verify(a.public_key(), sig, data)
    assert not identity.verify(b.public_key(), sig, data)
    assert not identity.verify(a.public_key(), sig, data + b"!")
    assert not identity.verify(a.public_key(), sig[:-1] + bytes([sig[-1] ^ 1]), data)
    assert not identity.verify(a.public_key(), sig + data[:4], data[4:])  # the same bytes, split elsewhere
    assert not identity.verify(a.public_key(), "not bytes", data)
    sig_b = identity.sign(b, data)
    assert identity.verify(b.public_key(), sig_b, data) and not identity.verify(a.public_key(), sig_b, data)


def test_remembered_key_encodings_follow_the_key_object(monkeypatch):
    """The OpenSSH encoding is remembered per key object (by identity). Keys created and
    dropped in a loop reuse ids in CPython, also once the memo evicts: every lookup must
    still give that key's own encoding, and signatures stay bound to their own key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from shared.secagg import identity

    monkeypatch.setattr(identity, "PUB_BYTES_ENTRIES", 3)
    monkeypatch.setattr(identity, "_PUB_BYTES", type(identity._PUB_BYTES)())
    for _ in range(50):
        key = ed25519.Ed25519PrivateKey.generate()
        pub = key.public_key()
        raw = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        assert identity._pub_bytes(pub) == raw and identity._pub_bytes(pub) == raw
        other = ed25519.Ed25519PrivateKey.generate().public_key()
        sig = identity.sign(key, b"survivors")
        assert identity.verify(pub, sig, b"survivors") and not identity.verify(other, sig, b"survivors")
    assert len(identity._PUB_BYTES) <= 3


def test_roster_holds_encodings_and_gives_the_registered_keys(tmp_path):
    """The roster keeps each key's OpenSSH encoding, not an OpenSSL object per owner (27 MB at
    10,000 simulated owners, in the server and every worker), and gives back the very key that
    was registered under each fingerprint; a key it does not hold is absent, not parsed."""
    from cryptography.hazmat.primitives import serialization

    from shared.secagg import identity

    roster_dir = identity.make_simulation_keys(tmp_path, [f"partition-{i}" for i in range(5)])
    roster = identity.load_roster(roster_dir)
    assert len(roster) == 5 and all(isinstance(v, bytes) for v in roster._encoded.values())
    for i in range(5):
        key = serialization.load_ssh_private_key((tmp_path / f"partition-{i}").read_bytes(), None)
        fp = identity.fingerprint(key.public_key())
        assert fp in roster and identity.fingerprint(roster[fp]) == fp
        sig = identity.sign(key, b"advertisement")
        assert identity.verify(roster[fp], sig, b"advertisement")
    assert b"\0" * 32 not in roster and roster.get(b"\0" * 32) is None
    assert identity.cached_roster(roster_dir) is identity.cached_roster(roster_dir)  # read once per process
