"""Deployment end to end: real `fedlora server` / `fedlora client` / `fedlora run` processes on 127.0.0.1.

One SuperLink (TLS + SuperNode auth) and client agents as separate processes, each with
its own CSV; two rounds of DP training with secure aggregation on a random-weight tiny BERT.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.certs import create_certs
from shared.data import synthetic_federation
from simulations.local_deploy import Processes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


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
    procs = Processes(tmp_path)
    yield tmp_path, certs, allowed, other_ca, procs
    procs.stop_all()


def test_three_owners_two_rounds_tls_node_auth_secagg_dp(federation):
    tmp, certs, allowed, other_ca, procs = federation
    ca = str(certs / "ca.crt")
    t0 = time.monotonic()
    address = procs.start_server(certs, allowed, tmp / "state" / "link.db")
    assert "client-1.pub: node" in procs.log("server")

    common = ["--superlink", address, "--text-column", "text", "--label-column", "label"]
    for i in (1, 2, 3):
        procs.start(f"owner{i}", "client", *common, "--root-cert", ca, "--roster", str(allowed), "--node-key",
                    str(certs / "supernodes" / f"client-{i}"), "--data", str(tmp / f"owner{i}.csv"),
                    "--ledger", str(tmp / f"ledger{i}.json"), "--target-epsilon", "6.0" if i == 3 else "8.0")
    # a registered node whose file is malformed (validation skipped to reach the ClientApp)
    procs.start("owner4", "client", *common, "--root-cert", ca, "--roster", str(allowed), "--node-key",
                str(certs / "supernodes" / "client-4"),
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
    trained = {k: c for k, c in summary["clients"].items() if c["rounds_trained"] > 0}
    assert len(trained) == 3, summary["clients"]
    assert all(c["epsilon"] is not None and c["epsilon"] > 0 for c in trained.values())
    assert min(c["epsilon"] for c in trained.values()) <= 6.0 + 1e-6  # owner 3's own, smaller budget
    assert (out / "checkpoints" / "round-002" / "adapter_model.safetensors").is_file()
    # `fedlora predict` on the deployment's checkpoint reproduces the server's evaluation
    pred = subprocess.run([sys.executable, "-m", "fedlora", "predict", "--checkpoint", str(out), "--data",
                           str(tmp / "test.csv"), "--output", str(tmp / "scored.csv")],
                          capture_output=True, text=True, timeout=300, cwd=tmp)
    assert pred.returncode == 0, pred.stderr[-2000:]
    scored = json.loads(pred.stdout.strip().splitlines()[-1])["metrics"]
    assert scored["accuracy"] == pytest.approx(summary["final"]["accuracy"])
    assert scored["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)
    for i in (1, 2, 3):
        ledger = json.loads((tmp / f"ledger{i}.json").read_text())
        assert ledger["rounds_trained"] == [1, 2]
        # one long-lived ClientApp process per agent: the model loaded once over both rounds
        # (the agent's default home is next to its ledger's folder)
        assert (tmp.parent / "agent" / f"ledger{i}" / "client.log").read_text().count("loaded model") == 1
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


# --- helpers for the dropout / restart and the "nothing in the clear" tests -------------

def descendants(pid: int) -> list[int]:
    """Every live process below pid (the agent's SuperNode runs in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(procs: Processes, name: str) -> None:
    """SIGKILL an agent and everything it started, as if its machine died."""
    proc = procs.procs[name]
    groups = {os.getpgid(p) for p in [proc.pid, *descendants(proc.pid)] if Path(f"/proc/{p}").exists()}
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=20)


def start_owner(procs: Processes, name: str, tmp: Path, certs: Path, address: str, i: int, *flags: str, **extra: str) -> None:
    for k, v in extra.items():
        flags += (f"--{k.replace('_', '-')}", v)
    procs.start_agent(name, address, certs, i, tmp / f"owner{i}.csv", tmp / f"ledger{i}.json", tmp / f"agent{i}", *flags)


def run_command(tmp: Path, certs: Path, address: str, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "fedlora", "run", "--superlink", address, "--root-cert", str(certs / "ca.crt"),
            "--model", "tiny-bert", "--test-data", str(tmp / "test.csv"), "--batch-size", "8", "--max-length", "24",
            "--lr", "0.005", "--output", str(out), *flags]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def wait_for(what: str, check, timeout: float, run: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if run is not None and run.poll() is not None:
            value = check()
            if value:
                return value
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def rounds_done(out: Path) -> list[int]:
    summary = read_json(out / "summary.json") or {}
    return [r["round"] for r in summary.get("rounds", [])]


def test_dropout_mid_round_and_restart_keeps_the_ledger_composing(federation):
    """An agent killed during round 2 (secure aggregation, complete graph, DP on): the round
    completes with the survivors, and after a restart with the same key and ledger the owner
    rejoins and its epsilon keeps composing from what it had spent."""
    from client.privacy import PrivacyLedger

    tmp, certs, allowed, _, procs = federation
    t0 = time.monotonic()
    address = procs.start_server(certs, allowed, tmp / "state" / "link.db")
    for i in (1, 2, 3):
        start_owner(procs, f"owner{i}", tmp, certs, address, i)
    out = tmp / "results"
    run_log = tmp / "run.log"
    with open(run_log, "w") as log:
        run = subprocess.Popen(run_command(tmp, certs, address, out, "--num-clients", "3", "--rounds", "3",
                                           "--secagg-neighbours", "2"),
                               stdout=log, stderr=subprocess.STDOUT, text=True, cwd=tmp,
                               env=os.environ | {"HOME": str(tmp / "home")}, start_new_session=True)
    try:
        ledger2 = tmp / "ledger2.json"
        wait_for("round 1", lambda: 1 in rounds_done(out), 240, run, run_log)
        assert read_json(ledger2)["rounds_trained"] == [1]
        kill_tree(procs, "owner2")  # round 2 is under way: its secure-aggregation stages have begun
        t_kill = time.monotonic()
        assert 3 not in rounds_done(out)
        before = PrivacyLedger.from_json(ledger2.read_text())
        eps_before = before.epsilon()
        assert eps_before > 0

        # the SuperLink notices the dead node (missed heartbeats) and the round goes on without it
        wait_for("round 2 without the killed owner", lambda: 2 in rounds_done(out), 200, run, run_log)
        print(f"round 2 finished {time.monotonic() - t_kill:.1f} s after the kill")
        r2 = next(r for r in read_json(out / "summary.json")["rounds"] if r["round"] == 2)
        if 2 in before.rounds_trained:  # killed after it trained: its update may or may not have made it
            assert r2["clients_trained"] in (2, 3), r2
        else:
            assert r2["clients_trained"] == 2, r2
        assert (out / "checkpoints" / "round-002" / "adapter_model.safetensors").is_file()
        assert "secure aggregation failed" not in run_log.read_text(errors="replace")

        # round 3 waits for three nodes; the owner comes back with the same key and ledger
        start_owner(procs, "owner2-again", tmp, certs, address, 2)
        run.wait(timeout=240)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    elapsed = time.monotonic() - t0
    print(f"dropout/restart run: {elapsed:.1f} s")
    text = run_log.read_text(errors="replace")
    assert run.returncode == 0, text[-4000:]
    summary = read_json(out / "summary.json")
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    r3 = summary["rounds"][2]
    assert r3["clients_trained"] == 3, r3
    after = PrivacyLedger.from_json(ledger2.read_text())
    assert after.rounds_trained[: len(before.rounds_trained)] == before.rounds_trained  # never reset
    assert after.rounds_trained[-1] == 3 and len(after.rounds_trained) > len(before.rounds_trained)
    # Opacus merges consecutive identical (sigma, q, steps) entries, so compare steps per mechanism
    def steps(ledger):
        out = {}
        for sigma, q, n in ledger.accountant_state["history"]:
            out[(sigma, q)] = out.get((sigma, q), 0) + n
        return out

    s_before, s_after = steps(before), steps(after)
    assert all(s_after.get(k, 0) >= n for k, n in s_before.items())
    assert sum(s_after.values()) > sum(s_before.values())
    assert after.epsilon() > eps_before
    assert r3["epsilon_max"] is not None and after.epsilon() <= r3["epsilon_max"] + 1e-6
    for i in (1, 3):  # the owners that never dropped trained every round
        assert read_json(tmp / f"ledger{i}.json")["rounds_trained"] == [1, 2, 3]
    # each agent loads the model once, in its long-lived ClientApp process: once in three
    # rounds for owners 1 and 3, once per start for owner 2
    loads = {i: (tmp / f"agent{i}" / "client.log").read_text().count("loaded model") for i in (1, 2, 3)}
    assert loads == {1: 1, 2: 2, 3: 1}, loads
    assert "SuperNode ID" in procs.log("owner2-again") or "joining" in procs.log("owner2-again")


def reproduce_first_round(config: dict, csv: Path):
    """One owner's round-1 local training, in this process, on the ClientApp's code path:
    with DP off it is deterministic (the trainer seeds torch from the run seed and round)."""
    import torch

    from client.local_data import client_frame
    from client.trainer import train_local
    from shared.config import FedConfig
    from shared.data import choose_max_length, encode
    from shared.lora import cached_model, load_trainable_state, trainable_state

    cfg = FedConfig.from_run_config(config)
    assert not cfg.dp
    frame, source = client_frame(cfg, {"data-path": str(csv), "text-column": "text", "label-column": "label"})
    model, tokenizer = cached_model(cfg, len(cfg.label_names))
    dataset = encode(frame, cfg.label_names, tokenizer, choose_max_length(frame["text"], tokenizer, cfg, model), source)
    start = {k: v.copy() for k, v in model.fedlora_initial_state.items()}  # round 1's global adapter
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the agent (--num-threads 1)
    try:
        load_trainable_state(model, start)
        train_local(model, dataset, cfg, None, None, server_round=1)
    finally:
        torch.set_num_threads(threads)
    trained = trainable_state(model)
    load_trainable_state(model, start)
    return start, trained, len(dataset)


def checkpoint_tensors(config: dict, folder: Path) -> dict:
    from server.checkpoint import load_checkpoint_state
    from shared.config import FedConfig
    from shared.lora import cached_model, load_trainable_state

    cfg = FedConfig.from_run_config(config)
    model, _ = cached_model(cfg, len(cfg.label_names))
    state = load_checkpoint_state(model, folder)
    load_trainable_state(model, model.fedlora_initial_state)
    return state


def server_side_bytes(tmp: Path, out: Path, run_output: str) -> dict[str, bytes]:
    """Everything the server side keeps: the SuperLink database (+ WAL), its logs, the run folder."""
    files = [*sorted((tmp / "state").glob("link.db*")), tmp / "state" / "superlink.log", tmp / "server.log",
             *sorted(p for p in out.rglob("*") if p.is_file())]
    blobs = {str(p): p.read_bytes() for p in files if p.is_file()}
    blobs["fedlora run output"] = run_output.encode()
    return blobs


def windows(buf: bytes, size: int = 32, count: int = 64) -> list[bytes]:
    n = len(buf) // size
    step = max(1, n // count)
    return [buf[i * size:(i + 1) * size] for i in range(0, n, step)][:count]


def found(targets: list[bytes], blobs: dict[str, bytes]) -> list[tuple[int, str]]:
    return [(i, name) for i, t in enumerate(targets) for name, blob in blobs.items() if t in blob]


def test_no_individual_update_in_the_clear_at_the_server(federation, monkeypatch):
    """With secure aggregation, no byte window of one owner's trained adapter, of its delta,
    or of its unmasked quantized update appears anywhere the server keeps data; with plain
    FedAvg (the control) the trained adapter's bytes do appear in the SuperLink's database."""
    import numpy as np

    from shared.secagg.quantize import choose_format, encode

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tmp, certs, allowed, _, procs = federation
    t0 = time.monotonic()
    address = procs.start_server(certs, allowed, tmp / "state" / "link.db")
    for i in (1, 2, 3):  # these owners opt in to non-private, unmasked runs (their policy declines them by default)
        start_owner(procs, f"owner{i}", tmp, certs, address, i, "--allow-no-dp", "--allow-plain-aggregation")
    common = ["--num-clients", "3", "--rounds", "1", "--no-dp", "--seed", "7", "--secagg-neighbours", "2"]
    env = os.environ | {"HOME": str(tmp / "home")}

    secure_out = tmp / "secure"
    run = subprocess.run(run_command(tmp, certs, address, secure_out, *common), capture_output=True, text=True,
                         timeout=300, cwd=tmp, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    secure_blobs = server_side_bytes(tmp, secure_out, run.stdout + run.stderr)  # before the control run
    print(f"secure run: {time.monotonic() - t0:.1f} s")

    plain_out = tmp / "plain"
    run = subprocess.run(run_command(tmp, certs, address, plain_out, *common, "--no-secure-agg"), capture_output=True,
                         text=True, timeout=300, cwd=tmp, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    plain_blobs = server_side_bytes(tmp, plain_out, run.stdout + run.stderr)
    print(f"both runs: {time.monotonic() - t0:.1f} s")

    config = read_json(secure_out / "summary.json")["config"]
    # every owner's round-1 training, reproduced here
    local = {i: reproduce_first_round(config, tmp / f"owner{i}.csv") for i in (1, 2, 3)}
    start = local[1][0]
    total = sum(n for _, _, n in local.values())
    expected = {k: sum(n * tr[k].astype(np.float64) for _, tr, n in local.values()) / total for k in start}
    # the reproduction is exact: both runs' round-1 globals are the weighted mean of the reproduced updates
    for out, atol in ((plain_out, 1e-6), (secure_out, 1e-5)):
        got = checkpoint_tensors(config, out / "checkpoints" / "round-001")
        assert set(got) == set(start)
        for k in start:
            assert not np.allclose(local[1][1][k], start[k]), k  # every tensor trained
            np.testing.assert_allclose(got[k], expected[k], atol=atol, rtol=0, err_msg=f"{out.name}: {k}")

    _, trained, weight = local[1]
    keys = list(start)  # the order of the global ArrayRecord (and of the secure-aggregation vector)
    lora_b = b"".join(np.ascontiguousarray(trained[k], dtype=np.float32).tobytes() for k in keys if "lora_B" in k)
    delta = {k: trained[k].astype(np.float64) - start[k].astype(np.float64) for k in keys}
    delta32 = b"".join(delta[k].astype(np.float32).tobytes() for k in keys if "lora_B" not in k)  # B's delta == B
    delta64 = b"".join(delta[k].tobytes() for k in keys)
    ring = encode(np.concatenate([delta[k].reshape(-1) for k in keys]), weight, choose_format(3)).tobytes()
    global_bytes = b"".join(v.tobytes() for v in start.values())
    targets = {name: [w for w in windows(buf) if w not in global_bytes and len(set(w)) > 8]
               for name, buf in (("trained lora_B", lora_b), ("delta f32", delta32), ("delta f64", delta64),
                                 ("unmasked ring vector", ring))}
    assert all(len(t) >= 6 for t in targets.values()), {k: len(v) for k, v in targets.items()}

    # positive control: plain FedAvg carries the trained adapter through the SuperLink in the clear
    hits = found(targets["trained lora_B"], plain_blobs)
    assert len({i for i, _ in hits}) >= len(targets["trained lora_B"]) // 2, (len(hits), sorted(plain_blobs))
    assert any("link.db" in name for _, name in hits), hits

    for name, ts in targets.items():
        assert found(ts, secure_blobs) == [], f"{name} of owner 1 found at the server"
    print(f"no-clear test: {time.monotonic() - t0:.1f} s")
