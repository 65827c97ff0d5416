"""Quick-start PKI for a federation: a CA, a server TLS certificate and SuperNode keys.

`fedlora certs --out DIR --server-name NAME --clients K` writes:

    DIR/ca.crt                 the CA certificate: every client agent and `fedlora run` need it
    DIR/ca.key                 the CA's private key (keep it offline; not needed at runtime)
    DIR/server.crt, server.key the SuperLink's TLS certificate (SAN: NAME, localhost, 127.0.0.1)
    DIR/supernodes/client-N        SuperNode N's private key (OpenSSH format, ECDSA P-384):
                                   give it to data owner N only
    DIR/supernodes/client-N.pub    its public key (OpenSSH format): the server's allow-list

Flower 1.41 authenticates SuperNodes with NIST-curve EC keys in OpenSSH format
(`flower-supernode --auth-supernode-private-key`, `flwr supernode register KEY.pub`);
`fedlora server` registers every `*.pub` in `DIR/supernodes/` on start.
An operator with their own PKI skips this command and points `fedlora server --certs`
at a folder holding their `ca.crt`, `server.crt`, `server.key` and the owners' `.pub` keys.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.atomic import atomic_write
from shared.errors import FedLoraError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
SUPERNODES = "supernodes"
VALID_DAYS = 825


def _write(path: Path, data: bytes, private: bool = False) -> None:
    atomic_write(path, data, private=private)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(server_name: str) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys([server_name, "localhost", "127.0.0.1"]):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_ca(common_name: str = "fedlora federation CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def make_server_cert(server_name: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey):
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(server_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(server_name), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def make_node_key() -> tuple[bytes, bytes]:
    """(private key, public key), both in the OpenSSH format Flower's node auth reads."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def create_certs(out: Path, server_name: str, clients: int, force: bool = False) -> dict[str, object]:
    if clients < 0:
        raise FedLoraError("--clients must be 0 or more")
    if not server_name.strip():
        raise FedLoraError("--server-name must not be empty")
    out = Path(out)
    if (out / CA_KEY).exists() and not force:
        raise FedLoraError(f"{out / CA_KEY} exists: pick another --out or pass --force to replace the whole set")
    ca_cert, ca_key = make_ca()
    srv_cert, srv_key = make_server_cert(server_name, ca_cert, ca_key)
    _write(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / CA_KEY, _pem_key(ca_key), private=True)
    _write(out / SERVER_CERT, srv_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / SERVER_KEY, _pem_key(srv_key), private=True)
    nodes = []
    for i in range(1, clients + 1):
        private, public = make_node_key()
        _write(out / SUPERNODES / f"client-{i}", private, private=True)
        _write(out / SUPERNODES / f"client-{i}.pub", public)
        nodes.append(str(out / SUPERNODES / f"client-{i}"))
    return {"out": str(out), "ca": str(out / CA_CERT), "server_cert": str(out / SERVER_CERT),
            "server_key": str(out / SERVER_KEY), "node_keys": nodes}


def allowed_public_keys(path: Path) -> list[Path]:
    """The SuperNode public keys to allow: a `.pub` file, or every `*.pub` in a folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(path.glob("*.pub"))
    return []
