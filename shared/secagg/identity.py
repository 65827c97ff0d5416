"""Owner identities for secure aggregation: signing keys and the registered roster.

Every data owner signs its per-round key advertisement and its view of the survivor set
with a long-term signing key whose public half the operator registered: by default the
owner's SuperNode key (``fedlora client --node-key``, ECDSA on a NIST curve, OpenSSH
format), or any OpenSSH Ed25519/ECDSA key. Peers verify these signatures against their
*local* roster: a folder of OpenSSH ``.pub`` files (or one file with a key per line) that
the operator hands each owner together with ``ca.crt`` (``certs/supernodes/*.pub``), never
something the aggregation server sends. A key is named by its fingerprint, the SHA-256 of
its OpenSSH public encoding. The server relays messages but holds no roster private key,
so it cannot forge an advertisement, invent clients, or make two clients accept different
survivor sets.

In simulation each virtual client gets a fresh key (P-256) and the set of their public
keys is the roster (:func:`make_simulation_keys`).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

ENV_SIM_DIR = "FEDLORA_SECAGG_KEYS"
"""Simulation only: folder with ``partition-N`` private keys and ``roster/``."""


class IdentityError(ValueError):
    """Missing or unusable signing key or roster."""


_PUB_BYTES: OrderedDict[int, tuple[object, bytes]] = OrderedDict()
PUB_BYTES_ENTRIES = 4096
"""Keys whose encoding is remembered: each entry pins its key object (about 2.6 kB), and a
round only verifies its own owners' keys."""
PARSED_KEYS = 4096


def _openssh(pub) -> bytes:
    """The key's OpenSSH public encoding: what a fingerprint hashes and a roster file holds."""
    return pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def _pub_bytes(pub) -> bytes:
    """The key's OpenSSH encoding, remembered per key object: serializing costs more than the
    signature check it keys (cryptography's key objects are unhashable, so the memo is keyed
    by identity and holds the object, whose id then cannot be reused)."""
    hit = _PUB_BYTES.get(id(pub))
    if hit is not None and hit[0] is pub:
        return hit[1]
    raw = _openssh(pub)
    _PUB_BYTES[id(pub)] = (pub, raw)
    while len(_PUB_BYTES) > PUB_BYTES_ENTRIES:
        try:
            _PUB_BYTES.popitem(last=False)
        except KeyError:  # emptied by another thread
            break
    return raw


def fingerprint(pub) -> bytes:
    return hashlib.sha256(_pub_bytes(pub)).digest()


def sign(key, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    raise IdentityError("signing key must be Ed25519 or ECDSA")


_VERIFIED: OrderedDict[bytes, None] = OrderedDict()
VERIFIED_ENTRIES = 65536


def verify(pub, sig: bytes, data: bytes) -> bool:
    """Whether `sig` is `pub`'s signature of `data`. A simulation worker serves many virtual
    clients, and every neighbour of an owner checks the same advertisement (each owner's
    signed survivor set likewise): a signature already found valid in this process is
    remembered by the SHA-256 of (key, signature, data), length-prefixed, so the same bytes
    are not verified twice. Only valid signatures are remembered; any other triple is checked."""
    if not isinstance(sig, bytes) or len(sig) > 256 or not isinstance(data, bytes):
        return False
    h = hashlib.sha256()
    for part in (_pub_bytes(pub), sig, data):
        h.update(len(part).to_bytes(8, "big") + part)
    key = h.digest()
    if key in _VERIFIED:
        return True
    try:
        if isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(sig, data)
        else:
            pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    _VERIFIED[key] = None
    if len(_VERIFIED) > VERIFIED_ENTRIES:
        _VERIFIED.popitem(last=False)
    return True


@dataclass(frozen=True)
class Identity:
    key: object
    fingerprint: bytes
    roster: Mapping  # fingerprint -> public key

    def sign(self, data: bytes) -> bytes:
        return sign(self.key, data)


def _load_private(path: Path):
    data = path.read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError):
        try:
            key = serialization.load_pem_private_key(data, None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"{path}: not an OpenSSH or PEM private key") from exc
    if not isinstance(key, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
        raise IdentityError(f"{path}: signing key must be Ed25519 or ECDSA")
    return key


@lru_cache(maxsize=PARSED_KEYS)
def _parse_public(raw: bytes):
    """A roster key's object from its OpenSSH encoding; the same bytes give the same object, so
    the encoding memo above and cryptography's own caches see one object per key."""
    return serialization.load_ssh_public_key(raw)


class Roster(Mapping):
    """Fingerprint -> public key, holding each key as its OpenSSH encoding (about 170 bytes)
    and building key objects on use (at most PARSED_KEYS kept). A parsed key costs about 2.6 kB
    in OpenSSL, so a simulation roster of 10,000 owners held as objects took 27 MB in the
    server and in every worker; a round only touches its sampled owners' keys."""

    def __init__(self, encoded: dict[bytes, bytes]) -> None:
        self._encoded = encoded

    def __getitem__(self, fp: bytes):
        return _parse_public(self._encoded[fp])

    def __contains__(self, fp) -> bool:
        return fp in self._encoded

    def __iter__(self):
        return iter(self._encoded)

    def __len__(self) -> int:
        return len(self._encoded)


def load_roster(path: Path) -> Roster:
    """Fingerprint -> public key for every OpenSSH public key in a file or a folder of ``.pub``.
    Every key is parsed and checked here, once; the roster keeps their encodings."""
    path = Path(path)
    files = sorted(path.glob("*.pub")) if path.is_dir() else [path] if path.is_file() else []
    encoded = {}
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                pub = serialization.load_ssh_public_key(line.encode())
            except (ValueError, TypeError, serialization.UnsupportedAlgorithm) as exc:
                raise IdentityError(f"{f}: unreadable public key line") from exc
            if not isinstance(pub, (ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey)):
                raise IdentityError(f"{f}: roster keys must be Ed25519 or ECDSA")
            raw = _openssh(pub)
            encoded[hashlib.sha256(raw).digest()] = raw  # fingerprint(pub), without memoizing pub
    if not encoded:
        raise IdentityError(f"secure-aggregation roster {path} holds no public keys")
    return Roster(encoded)


@lru_cache(maxsize=64)
def _roster_cached(roster_path: str, mtime: float) -> Roster:
    return load_roster(Path(roster_path))


def cached_roster(path: Path) -> Roster:
    """`load_roster`, read once per process while the file or folder is unchanged."""
    return _roster_cached(str(path), _mtime(str(path)))


@lru_cache(maxsize=4096)
def _load_cached(key_path: str, roster_path: str, mtimes: tuple) -> Identity:
    key = _load_private(Path(key_path))
    roster = _roster_cached(roster_path, mtimes[1])
    fp = fingerprint(key.public_key())
    if fp not in roster:
        raise IdentityError(f"my signing key {key_path} is not in the roster {roster_path}")
    return Identity(key, fp, roster)


def _mtime(p: str) -> float:
    try:
        return os.stat(p).st_mtime
    except OSError:
        return -1.0


def load_identity(node_config) -> Identity:
    """The owner's identity from its local node config (deployment) or the simulation key folder."""
    key, roster = node_config.get("secagg-key"), node_config.get("secagg-roster")
    if not key and os.environ.get(ENV_SIM_DIR) and "partition-id" in node_config:
        base = Path(os.environ[ENV_SIM_DIR])
        key, roster = str(base / f"partition-{int(node_config['partition-id'])}"), str(base / "roster")
    if not key or not roster:
        raise IdentityError("secure aggregation needs this owner's signing key and the roster of registered "
                            "owner keys (fedlora client --node-key KEY --roster FOLDER)")
    key, roster = str(key), str(roster)
    return _load_cached(key, roster, (_mtime(key), _mtime(roster)))


def new_key_pair() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    return private, _openssh(key.public_key()) + b"\n"


def make_simulation_keys(folder: Path, names: list[str]) -> Path:
    """Write ``folder/NAME`` private keys and ``folder/roster/NAME.pub``; returns the roster folder."""
    folder = Path(folder)
    (folder / "roster").mkdir(parents=True, exist_ok=True)
    for name in names:
        private, public = new_key_pair()
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        (folder / "roster" / f"{name}.pub").write_bytes(public)
    return folder / "roster"
