"""A whole deployment on this machine, as real processes: `fedlora server` and `fedlora
client` agents, each in a session of its own with its log in a folder. The deployment
tests (tests/test_deploy_e2e.py) and the deployment benchmark (simulations/bench_deploy.py)
both drive it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SERVER_READY = "SuperLink listening"
AGENT_READY = "SuperNode ID"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """`fedlora` commands started by name; `stop_all` ends every one still running."""

    def __init__(self, folder: Path):
        self.folder, self.procs = folder, {}
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HOME": str(self.folder / "home")}
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "fedlora", *args], stdout=log,
                                            stderr=subprocess.STDOUT, env=env, cwd=self.folder,
                                            start_new_session=True)
        return self.procs[name]

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout: float) -> None:
        """Until `name` logs `text`; it exiting first or the timeout is an error with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(name):
                return
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"{name} never logged {text!r}:\n{self.log(name)[-3000:]}")

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 20) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM, timeout=30)

    def start_server(self, certs: Path, allowed: Path, state: Path, timeout: float = 120) -> str:
        """`fedlora server` with TLS and SuperNode authentication (the keys in `allowed`); its address."""
        address = f"127.0.0.1:{free_port()}"
        self.start("server", "server", "--certs", str(certs), "--address", address, "--state", str(state),
                   "--allow-keys", str(allowed))
        self.wait_for("server", SERVER_READY, timeout)
        return address

    def start_agent(self, name: str, address: str, certs: Path, i: int, data: Path, ledger: Path, home: Path,
                    *flags: str) -> None:
        """A `fedlora client` agent with `certs`' i-th SuperNode key, its own data, ledger and home."""
        self.start(name, "client", "--superlink", address, "--root-cert", str(certs / "ca.crt"),
                   "--roster", str(certs / "supernodes"), "--node-key", str(certs / "supernodes" / f"client-{i}"),
                   "--data", str(data), "--ledger", str(ledger), "--home", str(home), *flags)
