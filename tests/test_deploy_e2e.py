"""Deployment end to end: real `fedlora server` / `fedlora client` / `fedlora run` processes on 127.0.0.1.

One SuperLink (TLS + SuperNode auth) and client agents as separate processes, each with
its own CSV; two rounds of DP training with secure aggregation on a random-weight tiny BERT.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.certs import create_certs
from shared.data import synthetic_federation

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    def __init__(self, folder: Path):
        self.folder, self.procs = folder, {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HOME": str(self.folder / "home")}
        proc = subprocess.Popen([sys.executable, "-m", "fedlora", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=self.folder, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def wait_log(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(name):
                return
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"{name} never logged {text!r}:\n{self.log(name)[-3000:]}")

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)


@pytest.fixture
def federation(tmp_path):
    certs = tmp_path / "certs"
    create_certs(certs, "localhost", 5)
    allowed = tmp_path / "allowed"  # client-5 is not on the allow-list
    allowed.mkdir()
    for i in range(1, 5):
        shutil.copy(certs / "supernodes" / f"client-{i}.pub", allowed)
    other_ca = tmp_path / "other-ca"
    create_certs(other_ca, "localhost", 0)
    train, test = synthetic_federation(3, 40, 48, seed=0)
    for i, (_, part) in enumerate(train.groupby("brand"), start=1):
        part[["text", "label"]].to_csv(tmp_path / f"owner{i}.csv", index=False)
    test[["text", "label"]].to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "owner4.csv").write_text("text,label\n\"unterminated,1\nfoo\n")  # malformed
    (tmp_path / "home").mkdir()
    procs = Procs(tmp_path)
    yield tmp_path, certs, allowed, other_ca, procs
    procs.stop_all()


def test_three_owners_two_rounds_tls_node_auth_secagg_dp(federation):
    tmp, certs, allowed, other_ca, procs = federation
    port = free_port()
    address = f"127.0.0.1:{port}"
    ca = str(certs / "ca.crt")
    t0 = time.monotonic()
    procs.start("server", "server", "--certs", str(certs), "--address", address, "--state", str(tmp / "state" / "link.db"),
                "--allow-keys", str(allowed))
    procs.wait_log("server", "SuperLink listening", 90)
    assert "client-1.pub: node" in procs.log("server")

    common = ["--superlink", address, "--text-column", "text", "--label-column", "label"]
    for i in (1, 2, 3):
        procs.start(f"owner{i}", "client", *common, "--root-cert", ca, "--node-key",
                    str(certs / "supernodes" / f"client-{i}"), "--data", str(tmp / f"owner{i}.csv"),
                    "--ledger", str(tmp / f"ledger{i}.json"), "--target-epsilon", "6.0" if i == 3 else "8.0")
    # a registered node whose file is malformed (validation skipped to reach the ClientApp)
    procs.start("owner4", "client", *common, "--root-cert", ca, "--node-key", str(certs / "supernodes" / "client-4"),
                "--data", str(tmp / "owner4.csv"), "--ledger", str(tmp / "ledger4.json"), "--no-validate")
    # a node whose key is not on the allow-list, and one that does not trust the server's CA
    procs.start("intruder", "client", *common, "--root-cert", ca, "--node-key", str(certs / "supernodes" / "client-5"),
                "--data", str(tmp / "owner1.csv"), "--ledger", str(tmp / "ledger5.json"), "--max-retries", "2")
    procs.start("wrong-ca", "client", *common, "--root-cert", str(other_ca / "ca.crt"), "--node-key",
                str(certs / "supernodes" / "client-1"), "--data", str(tmp / "owner1.csv"),
                "--ledger", str(tmp / "ledger6.json"), "--max-retries", "2")

    out = tmp / "results"
    run = subprocess.run(
        [sys.executable, "-m", "fedlora", "run", "--superlink", address, "--root-cert", ca,
         "--model", "tiny-bert", "--test-data", str(tmp / "test.csv"), "--num-clients", "4", "--rounds", "2",
         "--batch-size", "8", "--max-length", "24", "--lr", "0.005", "--secagg-neighbours", "3",
         "--output", str(out)],
        capture_output=True, text=True, timeout=420, cwd=tmp, env=os.environ | {"HOME": str(tmp / "home")},
    )
    elapsed = time.monotonic() - t0
    print(f"deployment run: {elapsed:.1f} s")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]

    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for r in summary["rounds"]:
        assert r["clients_trained"] == 3, r
        assert r["epsilon_max"] is not None and 0 < r["epsilon_max"] <= 8.0 + 1e-6
    trained = {k: c for k, c in summary["clients"].items() if c.get("num_examples")}
    assert len(trained) == 3, summary["clients"]
    assert all(c["epsilon"] is not None and c["epsilon"] > 0 for c in trained.values())
    assert min(c["epsilon"] for c in trained.values()) <= 6.0 + 1e-6  # owner 3's own, smaller budget
    assert (out / "checkpoints" / "round-002" / "adapter_model.safetensors").is_file()
    for i in (1, 2, 3):
        ledger = json.loads((tmp / f"ledger{i}.json").read_text())
        assert ledger["rounds_trained"] == [1, 2]
    assert not (tmp / "ledger4.json").exists()
    # the malformed file is reported for that node only
    assert "cannot read" in procs.log("owner4") or "clients_failed" in json.dumps(summary)
    assert all(r["clients_failed"] >= 1 for r in summary["rounds"])
    # the unauthorised and the untrusting nodes never joined
    for name in ("intruder", "wrong-ca"):
        assert "SuperNode ID" not in procs.log(name), procs.log(name)[-2000:]
    assert "Failed to activate SuperNode" in procs.log("intruder")
    assert "CERTIFICATE_VERIFY_FAILED" in procs.log("wrong-ca")
    assert "No SuperNode found with the given public key" in (tmp / "state" / "superlink.log").read_text()
