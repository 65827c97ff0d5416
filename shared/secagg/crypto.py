"""Key agreement, key derivation and authenticated share encryption.

Everything comes from ``cryptography``: X25519 for agreement, HKDF-SHA256 for keys
(salted with the per-round session id so keys never repeat across rounds/runs) and
AES-256-GCM for the Shamir shares relayed through the server. The associated data binds
protocol id, session id, round, sender and receiver, so a ciphertext that is tampered
with, replayed from another round or routed to another node fails authentication.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .protocol import PROTOCOL_ID

__all__ = [
    "InvalidTag",
    "KeyPair",
    "ShareDecryptionError",
    "agree",
    "agree_many",
    "commit_seed",
    "decrypt_share",
    "encrypt_share",
    "generate_keypair",
    "pair_mask_seed",
    "public_from_private",
    "share_key",
]

_NONCE_LEN = 12


class ShareDecryptionError(ValueError):
    """A relayed share failed authentication (tampered, replayed or misrouted)."""


@dataclass(frozen=True)
class KeyPair:
    """Raw 32-byte X25519 key pair."""

    private: bytes
    public: bytes


def generate_keypair() -> KeyPair:
    sk = X25519PrivateKey.generate()
    return KeyPair(
        private=sk.private_bytes_raw(),
        public=sk.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ),
    )


def public_from_private(private: bytes) -> bytes:
    """Used by the server to check a reconstructed key against the advertised one."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def agree(private: bytes, peer_public: bytes) -> bytes:
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    if shared == bytes(32):
        raise ValueError("X25519 produced the all-zero secret (low-order public key)")
    return shared


def agree_many(private: bytes, peer_publics: list[bytes]) -> list[bytes]:
    """``agree`` with one private key and many peers (the key object is built once)."""
    sk = X25519PrivateKey.from_private_bytes(private)
    out = []
    for pk in peer_publics:
        shared = sk.exchange(X25519PublicKey.from_public_bytes(pk))
        if shared == bytes(32):
            raise ValueError("X25519 produced the all-zero secret (low-order public key)")
        out.append(shared)
    return out


def _pair(a: int, b: int) -> bytes:
    lo, hi = (a, b) if a < b else (b, a)
    return struct.pack("<QQ", lo, hi)


def _hkdf(secret: bytes, sid: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=sid, info=PROTOCOL_ID + info).derive(secret)


def share_key(shared_secret: bytes, sid: bytes, a: int, b: int) -> bytes:
    """AEAD key for shares exchanged between nodes ``a`` and ``b`` in session ``sid``."""
    return _hkdf(shared_secret, sid, b"/share-enc/" + _pair(a, b))


def pair_mask_seed(shared_secret: bytes, sid: bytes, rnd: int, a: int, b: int) -> bytes:
    """256-bit ChaCha20 key for the pairwise mask of ``a`` and ``b`` (symmetric in a, b)."""
    return _hkdf(shared_secret, sid, b"/pair-mask/" + struct.pack("<q", rnd) + _pair(a, b))


def _ad(sid: bytes, rnd: int, src: int, dst: int) -> bytes:
    return PROTOCOL_ID + b"/share/" + sid + struct.pack("<qQQ", rnd, src, dst)


def encrypt_share(key: bytes, plaintext: bytes, *, sid: bytes, rnd: int, src: int, dst: int) -> bytes:
    nonce = os.urandom(_NONCE_LEN)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _ad(sid, rnd, src, dst))


def decrypt_share(key: bytes, ciphertext: bytes, *, sid: bytes, rnd: int, src: int, dst: int) -> bytes:
    if len(ciphertext) <= _NONCE_LEN + 16:
        raise ShareDecryptionError("share ciphertext too short")
    try:
        return AESGCM(key).decrypt(
            ciphertext[:_NONCE_LEN], ciphertext[_NONCE_LEN:], _ad(sid, rnd, src, dst)
        )
    except InvalidTag as exc:
        raise ShareDecryptionError(f"share from node {src} to node {dst} failed authentication") from exc


def commit_seed(sid: bytes, node: int, seed: bytes) -> bytes:
    """Hash commitment to a self-mask seed, so the server can verify its reconstruction."""
    return hashlib.sha256(PROTOCOL_ID + b"/commit-b/" + sid + struct.pack("<Q", node) + seed).digest()
