"""`--ray-address`: a simulation on a Ray cluster started with `ray start` (a head and a
worker node, separate processes on this machine, on their own ports and temp dir) gives
the adapter the local engine gives for the same seed and data."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_scale import _assert_same, _cfg, _final_adapter, _simulate, _write_data

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_range(n: int) -> tuple[int, int]:
    for _ in range(100):
        base = random.randint(20000, 29000)
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base, base + n - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def _node_ports() -> list[str]:
    lo, hi = _free_range(30)
    args = ["--min-worker-port", str(lo), "--max-worker-port", str(hi)]
    for flag in ("--node-manager-port", "--object-manager-port", "--runtime-env-agent-port", "--metrics-export-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"):
        args += [flag, str(_free_port())]
    return args


def _stop(proc: subprocess.Popen) -> None:
    """Stop one `ray start --block` and every process it started, by their ids: its own
    session's process group, and any descendant that left it."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def ray_cluster(cpus_per_node: int = 1):
    """A head and one worker node started by `ray start`, yielding the head's address."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node), "--num-gpus", "0",
              "--object-store-memory", str(100 * 1024 ** 2), "--temp-dir", temp, "--disable-usage-stats"]
    procs = []
    try:
        for role in ("head", "worker"):
            extra = (["--head", "--port", str(port), "--include-dashboard", "false",
                      "--ray-client-server-port", str(_free_port())] if role == "head" else ["--address", address])
            log = open(Path(temp) / f"{role}.log", "wb")
            procs.append(subprocess.Popen([ray_cli, "start", *common, *extra, *_node_ports()], env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            _wait_for_nodes(address, len(procs), temp, procs)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(address: str, n: int, temp: str, procs, timeout: float = 180.0) -> None:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in Path(temp).glob("*.log"))
                raise RuntimeError(f"`ray start` exited with {proc.returncode}:\n{logs}")
        out = subprocess.run([ray_cli, "status", "--address", address], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.count("node_") >= n:
            return
        time.sleep(2)
    raise RuntimeError(f"the Ray cluster at {address} did not come up with {n} nodes in {timeout:.0f} s")


def test_simulation_on_a_ray_cluster_gives_the_local_engines_adapter(tmp_path, monkeypatch):
    import json

    data = _write_data(tmp_path)
    local = _cfg(data, tmp_path / "local", owners=4, workers=2)
    _simulate(local, None, monkeypatch)
    probe = tmp_path / "probe"
    with ray_cluster() as address:
        cluster = local.replace(workers=0, ray_address=address, output=str(tmp_path / "cluster"))
        _simulate(cluster, probe, monkeypatch)
    _assert_same(_final_adapter(tmp_path / "local"), _final_adapter(tmp_path / "cluster"))
    nodes = {json.loads(f.read_text())["ray-node"] for f in probe.glob("train-*.json")}
    assert len(nodes) == 2, "the virtual clients were to be served by both Ray nodes"
    assert not list((tmp_path / "cluster").glob(".fedlora-secagg-*")), "the run's signing keys outlived it"
