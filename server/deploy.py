"""`fedlora server`: the federation server, a Flower SuperLink over TLS with SuperNode auth.

One SuperLink serves the Fleet API (client agents), the Control API (`fedlora run`) and
the ServerApp runtime on one HTTPS address. Flower 1.41 authenticates SuperNodes by
public key: the SuperLink runs with `--enable-supernode-auth` and only keys registered
through the Control API (`flwr supernode register`) may join. `fedlora server` registers
every allowed `.pub` key on start; registrations persist in the `--state` database.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from shared.certs import CA_CERT, SERVER_CERT, SERVER_KEY, SUPERNODES, allowed_public_keys
from shared.errors import FedLoraError
from shared.flower_process import flower_bin, split_address, start_foreground

DEFAULT_ADDRESS = "0.0.0.0:9092"
CONNECTION = "fedlora"


def local_address(host: str, port: int) -> str:
    """Where a process on this machine reaches a server bound to host:port."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 90.0, what: str = "SuperLink") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedLoraError(f"{what} exited with status {proc.returncode} during start-up (see its log)")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise FedLoraError(f"{what} did not open {host}:{port} within {timeout:.0f} s")


def write_cli_config(flwr_home: Path, address: str, root_cert: Path | None) -> None:
    """A Flower CLI config naming one SuperLink connection, `fedlora`: TLS with `root_cert`,
    or plaintext when it is None (`--insecure`, tests only)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    tls = {"insecure": True} if root_cert is None else {"root-certificates": str(root_cert.resolve())}
    config = {"superlink": {"default": CONNECTION, CONNECTION: {"address": address, **tls}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")


def register_node_keys(keys: list[Path], address: str, ca: Path, cli_home: Path) -> list[str]:
    """Register SuperNode public keys through the Control API; already-registered keys are fine."""
    write_cli_config(cli_home, address, ca)
    env = os.environ | {"FLWR_HOME": str(cli_home)}
    lines = []
    for key in keys:
        out = subprocess.run([flower_bin("flwr"), "supernode", "register", str(key), CONNECTION, "--format", "json"],
                             env=env, capture_output=True, text=True, timeout=120)
        try:
            reply = json.loads(out.stdout[out.stdout.index("{"):])
        except ValueError:
            reply = {"success": False, "error-message": (out.stdout + out.stderr).strip()[-300:]}
        if reply.get("success"):
            lines.append(f"{key.name}: node {reply['node-id']}")
        elif "already in use" in str(reply.get("error-message", "")):
            lines.append(f"{key.name}: already registered")
        else:
            msg = str(reply.get("error-message", "")).strip().splitlines()
            raise FedLoraError(f"cannot register SuperNode key {key}: {msg[-1] if msg else 'unknown error'}")
    return lines


def superlink_command(certs: Path, host: str, port: int, state: Path, log_file: Path, node_auth: bool) -> list[str]:
    cmd = [flower_bin("flower-superlink"),
           "--ssl-ca-certfile", str(certs / CA_CERT), "--ssl-certfile", str(certs / SERVER_CERT),
           "--ssl-keyfile", str(certs / SERVER_KEY),
           "--host", host, "--port", str(port),
           "--database", str(state),
           "--disable-runtime-dependency-installation",
           "--log-file", str(log_file)]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def check_certs(certs: Path) -> None:
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (certs / name).is_file():
            raise FedLoraError(f"{certs / name} not found: create a set with `fedlora certs` or copy your PKI's "
                               f"{CA_CERT}, {SERVER_CERT} and {SERVER_KEY} there")


def run_superlink(certs: Path, address: str = DEFAULT_ADDRESS, state: Path | None = None,
                  allow_keys: Path | None = None, node_auth: bool = True, log_file: Path | None = None) -> int:
    certs = Path(certs).expanduser().resolve()
    check_certs(certs)
    host, port = split_address(address)
    state = Path(state or Path.home() / ".fedlora" / "server" / "state.db").expanduser().resolve()
    state.parent.mkdir(parents=True, exist_ok=True)
    log_file = Path(log_file or state.with_name("superlink.log")).expanduser().resolve()
    keys: list[Path] = []
    if node_auth:
        keys = allowed_public_keys(Path(allow_keys).expanduser() if allow_keys else certs / SUPERNODES)
        if not keys:
            raise FedLoraError(f"no SuperNode public keys (*.pub) in {allow_keys or certs / SUPERNODES}: "
                               "add the data owners' keys, or pass --no-node-auth (not recommended)")
    home = state.parent / "flwr-home"  # where the SuperLink unpacks submitted apps
    proc = start_foreground(superlink_command(certs, host, port, state, log_file, node_auth), home)
    try:
        wait_for_port(local_address(host, port).rsplit(":", 1)[0].strip("[]"), port, proc)
        if node_auth:
            for line in register_node_keys(keys, local_address(host, port), certs / CA_CERT, state.parent / "flwr-cli"):
                print(f"fedlora server: allowed SuperNode {line}", file=sys.stderr, flush=True)
        print(f"fedlora server: SuperLink listening on {host}:{port} (TLS, node auth "
              f"{'on' if node_auth else 'OFF'}); state {state}; log {log_file}", file=sys.stderr, flush=True)
        return proc.wait()
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        raise
