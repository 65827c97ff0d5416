"""Scale (issue 13): virtual clients that share a simulation worker stay isolated, and the
number of workers does not change the result.

Each owner holds a single label (owners 0 and 2 "pos", 1 and 3 "neg"), so a client that
trained on, or from, another client's adapter would move the head the other way. Two
probes wrap the real ClientApp inside the Ray workers and write what they see to
$FEDLORA_TEST_PROBE: the outer one the client's whole Context state after every message
(secure-aggregation stages included), the inner one, behind the secure-aggregation mod,
the training message and the trained adapter.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import client_app as fedlora_client
from client.secagg_mod import decode_state, secagg_mod
from shared.config import FedConfig
from shared.secagg.protocol import STATE_RECORD
from server.inprocess_grid import ensure_task_identity

PROBE_ENV = "FEDLORA_TEST_PROBE"
# An owner's own secure-aggregation secrets in its state record. ("share-keys" are not in the
# list: each is the Diffie-Hellman key of a pair, held by both of them by design.)
SECRET_KEYS = ("c-sk", "s-sk", "b", "own-b-share")
SIZES = (40, 72, 48, 64)  # rows of owners 0..3; labels alternate pos/neg
WORDS = {"pos": "great love excellent happy superb fast friendly clean".split(),
         "neg": "awful hate broken slow rude dirty late terrible".split()}
FILLER = "the service flight shop order staff product seat app bag".split()


# --- probes (run inside the Ray workers) --------------------------------------------------

def _plain(value):
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _ray_node() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return None


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _outer_probe(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    folder = os.environ.get(PROBE_ENV)
    if folder:
        state = {name: {k: _plain(v) for k, v in rec.items()} for name, rec in context.state.config_records.items()}
        entry = {"pid": os.getpid(), "node": int(context.node_id), "state": state,
                 "arrays": sorted(context.state.array_records), "metrics": sorted(context.state.metric_records)}
        with open(Path(folder) / f"state-{_partition(context)}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
    return reply


def _inner_probe(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    folder = os.environ.get(PROBE_ENV)
    if folder and "config" in msg.content.config_records:
        rnd = int(msg.content["config"]["server-round"])
        out = Path(folder) / f"train-{_partition(context)}-r{rnd}"
        np.savez(out.with_suffix(".in.npz"), **{k: v.numpy() for k, v in msg.content["arrays"].items()})
        np.savez(out.with_suffix(".out.npz"), **{k: v.numpy() for k, v in reply.content["arrays"].items()})
        out.with_suffix(".json").write_text(json.dumps({"config": dict(msg.content["config"]), "pid": os.getpid(),
                                                        "ray-node": _ray_node()}))
    return reply


probe_app = ClientApp(mods=[_outer_probe, secagg_mod, _inner_probe])
probe_app.train()(fedlora_client.train)


# --- helpers --------------------------------------------------------------------------------

def _write_data(folder: Path) -> tuple[Path, Path]:
    rng = random.Random(13)

    def row(owner: str, label: str) -> dict:
        words = rng.sample(WORDS[label], 3) + rng.sample(FILLER, 4)
        rng.shuffle(words)
        return {"owner": owner, "text": " ".join(words), "label": label}

    train = [row(f"owner{i}", "pos" if i % 2 == 0 else "neg") for i, n in enumerate(SIZES) for _ in range(n)]
    test = [row("", label) for label in ("pos", "neg") for _ in range(30)]
    import pandas as pd

    paths = folder / "train.csv", folder / "test.csv"
    pd.DataFrame(train).to_csv(paths[0], index=False)
    pd.DataFrame(test).drop(columns="owner").to_csv(paths[1], index=False)
    return paths


def _cfg(data: tuple[Path, Path], out: Path, owners: int, **kw) -> FedConfig:
    train = data[0]
    if owners < len(SIZES):  # the first `owners` owners only
        import pandas as pd

        frame = pd.read_csv(train)
        train = train.with_name(f"train-{owners}.csv")
        frame[frame.owner.isin([f"owner{i}" for i in range(owners)])].to_csv(train, index=False)
    base = dict(model="tiny-bert", data=str(train), test_data=str(data[1]), partition_by="owner", num_clients=owners,
                labels='["neg", "pos"]', rounds=2, batch_size=16, lr=5e-3, head_lr=0.5, max_length=32, head_rounds=0,
                dp=False, secure_agg=True, workers=1, client_cpus=1.0, output=str(out))
    base.update(kw)
    return FedConfig(**base)


def _simulate(cfg: FedConfig, probe: Path | None, monkeypatch) -> dict:
    import simulations.run as run

    if probe is not None:
        probe.mkdir(parents=True)
        monkeypatch.setenv(PROBE_ENV, str(probe))
        monkeypatch.setattr(run, "default_client_app", probe_app)
    try:
        return run.simulate(cfg)
    finally:
        monkeypatch.undo()


def _final_adapter(out: Path, rounds: int = 2) -> dict:
    from safetensors.numpy import load_file

    return load_file(out / "checkpoints" / f"round-{rounds:03d}" / "adapter_model.safetensors")


def _secagg_state(entry: dict) -> dict:
    """The client's secure-aggregation state as the probe saw it in the Context
    (client/secagg_mod.py::decode_state), secrets as hex strings, as the probe wrote them."""
    record = entry["state"].get(STATE_RECORD)
    if not record:
        return {}
    state = decode_state(ConfigRecord({"json": record["json"], "blob": bytes.fromhex(record["blob"])}))
    return {k: _plain(v) for k, v in state.items()}


def _states(probe: Path, pid: int) -> list[dict]:
    return [json.loads(line) for line in (probe / f"state-{pid}.jsonl").read_text().splitlines()]


def _alone(cfg_json: dict, arrays_in: dict, partition: int) -> dict:
    """The same training message handled by a client alone: a fresh Context in this process."""
    from flwr.app import Array

    ensure_task_identity()
    config = ConfigRecord(cfg_json)
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays_in.items()}), "config": config}),
                  dst_node_id=1, message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": partition, "num-partitions": 2},
                  state=RecordDict(), run_config={})
    reply = fedlora_client.train(msg, ctx)
    return {k: v.numpy() for k, v in reply.content["arrays"].items()}


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --- cheap checks ------------------------------------------------------------------------------

def test_backend_config_sizes_the_private_instance_and_never_attaches_by_itself():
    from simulations.run import ray_backend_config

    local = ray_backend_config(FedConfig(workers=4, client_cpus=0.5))
    assert local["init_args"]["address"] == "local" and local["init_args"]["num_cpus"] == 2.0
    assert local["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert "num_cpus" not in ray_backend_config(FedConfig())["init_args"]
    cluster = ray_backend_config(FedConfig(ray_address="10.0.0.1:6379"))["init_args"]
    assert "address" not in cluster and "num_cpus" not in cluster  # attach_ray connects first


def test_workers_and_ray_address_are_exclusive():
    from shared.errors import FedLoraError

    with pytest.raises(FedLoraError, match="--workers"):
        FedConfig(workers=2, ray_address="auto").validate()
    with pytest.raises(FedLoraError, match="--workers"):
        FedConfig(workers=-1).validate()


def test_replies_are_averaged_in_partition_order_whatever_order_they_arrive_in():
    """Float sums depend on their order; the strategy sorts before it sums."""
    from flwr.app import Array, MetricRecord

    from server.strategy import FedLoraStrategy

    rng = np.random.default_rng(0)
    values = [rng.normal(size=1000).astype(np.float32) * 10.0 ** rng.integers(-3, 3) for _ in range(4)]

    def reply(pid: int) -> Message:
        content = RecordDict({"arrays": ArrayRecord({"w": Array(values[pid])}),
                              "metrics": MetricRecord({"num-examples": 10 + 7 * pid, "partition-id": pid, "declined": 0})})
        return Message(content, dst_node_id=100 + pid, message_type="train")

    ensure_task_identity()

    strategy = FedLoraStrategy(FedConfig(num_clients=4), 4)
    results = set()
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        arrays, _, _ = strategy.aggregate_train(1, [reply(p) for p in order])
        results.add(arrays["w"].numpy().tobytes())
    assert len(results) == 1


def test_training_hands_freed_memory_back_to_the_system(monkeypatch):
    import sys

    import client.trainer as trainer

    calls = []
    monkeypatch.setattr(trainer, "release_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(trainer, "_train", lambda *a: trainer.TrainResult(0.0, 0))
    trainer.train_local(__import__("torch").nn.Linear(2, 2), None, FedConfig(dp=False))
    assert calls == [1]
    monkeypatch.undo()
    assert trainer.release_memory() is sys.platform.startswith("linux")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssAnon from /proc")
def test_freed_arrow_buffers_go_back_to_the_system():
    """Loading rows through Arrow (a simulation's partitions, 500,000 synthetic rows at 10,000
    clients) leaves its buffers in Arrow's own allocator after they are freed: the driver kept
    114 MB more than a 10-client run for the whole simulation until release_memory asked
    Arrow's pool to give them back."""
    import pyarrow as pa

    import client.trainer as trainer

    def anon_mb() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) // 1024 for line in fh if line.startswith("RssAnon"))

    rows = pa.concat_arrays([pa.array(["x" * 50] * 100_000) for _ in range(40)])  # ~400 MB with the chunks
    del rows
    held = anon_mb()
    trainer.release_memory()
    assert held - anon_mb() > 200


def test_the_resident_model_is_frozen_out_of_gc_yet_a_clients_garbage_is_still_collected(tiny_cfg):
    """A worker's full collection after each client must not walk the resident model
    (gc.freeze), and must still free what the client left in reference cycles."""
    import gc
    import weakref

    import client.trainer as trainer
    from shared.lora import _cached, cached_model

    _cached.cache_clear()
    model, _ = cached_model(tiny_cfg, 2)
    assert gc.get_freeze_count() > 0
    assert not any(obj is model for obj in gc.get_objects())  # frozen: outside every generation

    class Cycle:
        pass

    garbage = Cycle()
    garbage.self = garbage
    alive = weakref.ref(garbage)
    del garbage
    trainer.release_memory()
    assert alive() is None
    _cached.cache_clear()


# --- simulations ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("scale-data"))


@pytest.mark.slow
def test_clients_sharing_one_worker_train_as_if_alone_and_never_see_each_others_state(data, tmp_path, monkeypatch):
    """One worker serves both owners of disjoint labels, DP and secure aggregation on, two
    rounds: each owner's privacy ledger is its own accounting alone (owners of 40 and 72
    rows have different sampling rates and noise), no secret of one appears in the other's
    Context at any stage; and, non-privately, each owner's round-1 adapter is bit for bit
    what the same message gives a fresh client in a fresh process."""
    from client.privacy import PrivacyLedger, plan_privacy
    from shared.data import client_partition

    # (1) non-private: adapters
    probe = tmp_path / "probe-plain"
    cfg = _cfg(data, tmp_path / "plain", owners=2)
    _simulate(cfg, probe, monkeypatch)
    pids = {json.loads((probe / f"train-{p}-r1.json").read_text())["pid"] for p in (0, 1)}
    assert len(pids) == 1, "both owners were to be served by one worker"
    updates = []
    for p in (0, 1):
        meta = json.loads((probe / f"train-{p}-r1.json").read_text())
        arrays_in = dict(np.load(probe / f"train-{p}-r1.in.npz"))
        trained = dict(np.load(probe / f"train-{p}-r1.out.npz"))
        _assert_same(trained, _alone(meta["config"], arrays_in, p))
        updates.append({k: trained[k] - arrays_in[k] for k in trained})
    head = [k for k in updates[0] if "lora_" not in k and k.endswith("weight")][0]
    assert not np.allclose(updates[0][head], updates[1][head])  # disjoint labels: the owners' updates differ

    # (2) private, secure aggregation: accountants and secrets
    probe = tmp_path / "probe-dp"
    cfg = _cfg(data, tmp_path / "dp", owners=2, dp=True, target_epsilon=8.0)
    _simulate(cfg, probe, monkeypatch)
    states = {p: _states(probe, p) for p in (0, 1)}
    assert len({e["pid"] for p in (0, 1) for e in states[p]}) == 1, "both owners were to be served by one worker"
    labels = {p: set(client_partition(cfg, p)["label"]) for p in (0, 1)}
    assert labels[0].isdisjoint(labels[1])
    for p, other in ((0, 1), (1, 0)):
        secrets = {v for e in states[p] for k, v in _secagg_state(e).items() if k in SECRET_KEYS}
        assert len(secrets) >= 2 * 3  # three secrets or more a round, two rounds: the probe saw them
        seen_by_other = "\n".join(json.dumps(e["state"]) for e in states[other])
        leaked = [s for s in secrets if s in seen_by_other]
        assert not leaked, f"owner {p}'s secure-aggregation secrets in owner {other}'s Context"
        ledger = PrivacyLedger.from_json(states[p][-1]["state"]["privacy-ledger"]["json"])
        assert json.dumps(ledger.to_json()) not in seen_by_other
        plan = plan_privacy(cfg, len(client_partition(cfg, p)))
        alone = PrivacyLedger(cfg.delta, cfg.target_epsilon)
        alone.accountant_state["history"] = [[plan.prior_noise, 1.0, 1]] * bool(plan.prior_noise) + [
            [plan.noise_multiplier, plan.sample_rate, 2 * plan.steps_per_round]]  # its label prior's release, then DP-SGD
        assert ledger.rounds_trained == [1, 2]
        assert [list(h) for h in ledger.accountant_state["history"]] == alone.accountant_state["history"]
        assert ledger.epsilon() == pytest.approx(alone.epsilon(), rel=1e-12)
    assert states[0][-1]["state"]["privacy-ledger"] != states[1][-1]["state"]["privacy-ledger"]


@pytest.mark.slow
@pytest.mark.parametrize("secure_agg", [True, False], ids=["secagg", "plain"])
def test_one_and_four_workers_give_the_same_adapter(data, tmp_path, monkeypatch, secure_agg):
    """Same seed, four owners, two rounds, non-private: the final adapter is bit for bit
    the same whether one worker serves the owners one after another or four serve them
    at once (replies then arrive in another order)."""
    finals, workers_seen = [], []
    for workers in (1, 4):
        out, probe = tmp_path / f"w{workers}", tmp_path / f"probe-w{workers}"
        _simulate(_cfg(data, out, owners=4, secure_agg=secure_agg, workers=workers), probe, monkeypatch)
        finals.append(_final_adapter(out))
        workers_seen.append(len({json.loads(f.read_text())["pid"] for f in probe.glob("train-*.json")}))
    assert workers_seen[0] == 1 and workers_seen[1] > 1
    _assert_same(finals[0], finals[1])


@pytest.mark.parametrize("rows_per_brand,clients", [(10, 7), (17, 10), (50, 60)])
def test_iid_sizes_by_arithmetic_match_the_partitions_flower_cuts(rows_per_brand, clients):
    """Thousands of owners: sizes come from arithmetic, and must equal what each cut holds."""
    from shared.data import _partitioner, client_partition, load_federation, partitioning

    cfg = FedConfig(num_clients=clients, partition_by="", partition="iid", examples_per_brand=rows_per_brand,
                    min_client_examples=0)
    parts = partitioning(cfg)
    assert sum(parts.sizes) == len(load_federation(cfg).train)
    assert parts.sizes == [len(client_partition(cfg, pid)) for pid in range(len(parts.kept))]
    assert type(parts.partitioner) is type(_partitioner(cfg))


def test_preflight_samples_lengths_only_for_many_owners():
    from simulations.run import LENGTH_SAMPLE, length_sample

    assert length_sample([5, 9, 7], seed=0) == [0, 1, 2]
    sizes = list(range(100, 100 + 5 * LENGTH_SAMPLE))
    picked = length_sample(sizes, seed=0)
    assert len(picked) <= LENGTH_SAMPLE and 0 in picked and len(sizes) - 1 in picked
    assert picked == length_sample(sizes, seed=0)
