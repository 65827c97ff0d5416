"""Starting Flower's own processes (SuperLink, SuperNode) in the foreground, for both sides."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from shared.errors import FedLoraError


def flower_bin(name: str) -> str:
    """A Flower console script from this interpreter's environment (or PATH)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FedLoraError(f"{name} not found: install fedlora with the README's install command")
    return found


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise FedLoraError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _die_with_parent() -> None:
    """Linux: the Flower process gets SIGTERM if fedlora dies (even by SIGKILL), so a killed
    agent or server never leaves an orphaned SuperNode/SuperLink behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every process an agent or server starts: offline, quiet, and
    with this environment's scripts on PATH, since Flower starts its own helpers
    (flower-superexec, flwr-serverapp, ...) by name even when the venv was never activated."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return os.environ | {"FLWR_HOME": str(flwr_home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                         "TRANSFORMERS_VERBOSITY": "error", "PATH": path}


def start_foreground(cmd: list[str], flwr_home: Path) -> subprocess.Popen:
    """Start a Flower process in a process group of its own (outside the terminal's
    foreground group, so a Ctrl-C reaches it once, through us), offline, with our signals
    forwarded to that group and so to every process `start_in_group` adds to it."""
    proc = subprocess.Popen(cmd, env=flower_env(flwr_home), process_group=0, preexec_fn=_die_with_parent)

    def forward(signum, _frame):
        if proc.poll() is None:
            os.killpg(proc.pid, signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    return proc


def start_in_group(cmd: list[str], flwr_home: Path, leader: subprocess.Popen) -> subprocess.Popen:
    """Start a helper in `leader`'s process group: one signal, or one kill, reaches both."""
    return subprocess.Popen(cmd, env=flower_env(flwr_home), process_group=leader.pid, preexec_fn=_die_with_parent)
