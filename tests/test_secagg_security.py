"""Secure aggregation against a malicious server and misbehaving clients (issue #11).

Each test names the audit finding it covers. The server here is the real workflow; the
attacks rewrite its messages in flight through :class:`server.inprocess_grid.InProcessGrid` hooks.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

import client.secagg_mod as mod
from server.secure_aggregation import SecAggConfig, SecureAggregation, secure_aggregate
from shared.secagg import crypto, identity, shamir
from shared.secagg.protocol import (
    MASKED_RECORD, RECORD, STATE_RECORD, Key, Stage, pack_blobs, pack_ids, resolve_k, ring_array, thresholds,
    unpack_blobs, unpack_ids,
)
from helpers import assert_matches, expected_fedavg, setup_round
from server.inprocess_grid import train_messages


def with_roster(grid, **kw) -> SecAggConfig:
    return SecAggConfig(roster=identity.load_roster(grid.roster_dir), **kw)


def stage_of(msg: Message) -> str | None:
    if not msg.has_content() or RECORD not in msg.content.config_records:
        return None
    return msg.content.config_records[RECORD].get(Key.STAGE)


# --- finding 1: a malicious server -----------------------------------------------------------

def _split_view_attack(n: int, group_b_size: int, threshold=None):
    """The server tells group B that the victim dropped (so they reveal its mask key) and everyone
    else that it survived (so they reveal its self-mask seed), then tries to rebuild both."""
    g, nodes, deltas, weights, grid = setup_round(n, seed=100 + n + group_b_size)
    victim = nodes[0]
    ads = {}
    graph_holder = {}

    def on_reply(msg):
        if stage_of(msg) == Stage.SETUP:
            rec = msg.content[RECORD]
            ads[msg.metadata.src_node_id] = (rec[Key.PK_S], rec[Key.COMMIT], rec[Key.SID] if Key.SID in rec else None)
        return msg

    def on_deliver(msg):
        st, dst = stage_of(msg), msg.metadata.dst_node_id
        rec = msg.content.config_records.get(RECORD) if msg.has_content() else None
        if st == Stage.SETUP:
            graph_holder["sid"] = rec[Key.SID]
        if st == Stage.SHARE_KEYS and dst == victim:
            graph_holder["nbrs"] = unpack_ids(rec[Key.IDS])
        if st in (Stage.CONSISTENCY, Stage.UNMASK) and dst in graph_holder.get("b", ()):
            rec[Key.SURVIVORS] = pack_ids([x for x in unpack_ids(rec[Key.SURVIVORS]) if x != victim])
        if st == Stage.CONSISTENCY and "b" not in graph_holder:
            pass
        return msg

    def deliver_wrapper(msg):
        if stage_of(msg) == Stage.CONSISTENCY and "b" not in graph_holder:
            graph_holder["b"] = set(graph_holder["nbrs"][:group_b_size])
        return on_deliver(msg)

    grid.on_reply, grid.on_deliver = on_reply, deliver_wrapper
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig(threshold=threshold))
    b_sh, sk_sh = [], []
    for r in grid.replies:
        if stage_of(r) == Stage.UNMASK and not r.has_error():
            rec = r.content[RECORD]
            for j, kind, share in zip(unpack_ids(rec[Key.IDS]), rec[Key.KIND], unpack_blobs(rec[Key.SHARES])):
                if j == victim:
                    (b_sh if kind == 0 else sk_sh).append(share)
    sid = graph_holder["sid"]
    pk_s, commit, _ = ads[victim]
    got_b = got_sk = False
    for t in range(1, len(b_sh) + 1):
        try:
            got_b |= crypto.commit_seed(sid, victim, shamir.combine(b_sh, t)) == commit
        except ValueError:
            pass
    for t in range(1, len(sk_sh) + 1):
        try:
            got_sk |= crypto.public_from_private(shamir.combine(sk_sh, t)) == pk_s
        except ValueError:
            pass
    return res, got_b, got_sk, len(b_sh), len(sk_sh)


@pytest.mark.parametrize("n", [4, 6, 10, 20])
def test_split_survivor_view_unmasks_nobody(n):
    """Finding 1 (reproduced 4/4 on the old code): a server telling different clients different
    drop-out lists collected both shares of one owner. Now, for every split of the victim's
    neighbourhood, it never holds both its self-mask seed and its mask key."""
    k = resolve_k(n, None)
    for size in range(1, k + 1):
        res, got_b, got_sk, nb, nsk = _split_view_attack(n, size, threshold=2)
        assert not (got_b and got_sk), (n, size, nb, nsk)
        assert not (nb and nsk) or nb + nsk <= k + 1


def test_server_requested_threshold_2_is_not_accepted():
    """Finding 1: the server chose the threshold and 2 was accepted. Clients now compute it from
    n and k: a survivor set below it is refused before any share leaves."""
    n = 10
    g, nodes, deltas, weights, grid = setup_round(n, seed=31)
    t, _ = thresholds(n, resolve_k(n, None))

    def deliver(msg):
        if stage_of(msg) in (Stage.CONSISTENCY, Stage.UNMASK):
            rec = msg.content[RECORD]
            few = sorted(unpack_ids(rec[Key.SURVIVORS]))[: t - 1]
            if msg.metadata.dst_node_id in few:
                rec[Key.SURVIVORS] = pack_ids(few)
        return msg

    grid.on_deliver = deliver
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig(threshold=2))
    revealed = [r for r in grid.replies if stage_of(r) == Stage.UNMASK and not r.has_error()]
    small = set(nodes[: t - 1])
    assert all(r.metadata.src_node_id not in small for r in revealed)
    assert all(r.metadata.src_node_id not in small for r in grid.replies
               if stage_of(r) == Stage.CONSISTENCY and not r.has_error())


def test_substituted_public_key_is_rejected_and_gets_no_share():
    """Finding 1: public keys were not authenticated. The server swaps one node's share key for
    its own: every neighbour refuses the advertisement and encrypts nothing to the server."""
    n = 6
    g, nodes, deltas, weights, grid = setup_round(n, seed=32)
    mitm = crypto.generate_keypair()
    target = nodes[2]

    def deliver(msg):
        if stage_of(msg) == Stage.SHARE_KEYS:
            rec = msg.content[RECORD]
            ids = unpack_ids(rec[Key.IDS])
            if target in ids:
                pk = unpack_blobs(rec[Key.PK_C])
                pk[ids.index(target)] = mitm.public
                rec[Key.PK_C] = pack_blobs(pk)
        return msg

    grid.on_deliver = deliver
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    for r in grid.replies:
        if stage_of(r) == Stage.SHARE_KEYS and not r.has_error():
            rec = r.content[RECORD]
            assert target not in unpack_ids(rec[Key.DST]) or r.metadata.src_node_id == target
    assert target in res.dropped
    assert_matches(res, expected_fedavg(g, [x for x in nodes if x != target], deltas, weights))


def test_node_outside_the_roster_is_refused(tmp_path):
    n = 5
    g, nodes, deltas, weights, grid = setup_round(n, seed=33)
    stranger = nodes[1]
    private, _ = identity.new_key_pair()
    (tmp_path / "stranger").write_bytes(private)
    ctx = grid.contexts[stranger]
    ctx.node_config["secagg-key"] = str(tmp_path / "stranger")
    # its own roster includes itself, the others' do not
    roster = tmp_path / "roster"
    roster.mkdir()
    for f in Path(grid.roster_dir).glob("*.pub"):
        (roster / f.name).write_bytes(f.read_bytes())
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_ssh_private_key(private, None)
    (roster / "stranger.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    ctx.node_config["secagg-roster"] = str(roster)
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert stranger in res.dropped
    assert_matches(res, expected_fedavg(g, [x for x in nodes if x != stranger], deltas, weights))


# --- finding 2: a misbehaving client costs only itself -----------------------------------------

BAD_VALUES = [0, -1, 1 << 62, "x", b"", b"\x00" * 33, b"\x07" * 32, True, 1.5, [1] * 5, [b"\x00" * 32] * 3,
              list(range(20_000)), [b"\x01" * shamir.SHARE_LEN] * 3,
              pack_ids([1, 2, 3]), pack_blobs([b"\x01" * shamir.SHARE_LEN] * 3)]
FIELDS = {
    Stage.SETUP: [Key.PK_C, Key.PK_S, Key.COMMIT, Key.FP, Key.SIG, Key.T, Key.T_LOCAL, Key.STAGE, Key.NODE_ID],
    Stage.SHARE_KEYS: [Key.DST, Key.CT, Key.REJECTED, Key.STAGE, Key.NODE_ID],
    Stage.COLLECT: [Key.REJECTED, Key.STAGE, Key.NODE_ID],
    Stage.CONSISTENCY: [Key.SIG, Key.STAGE, Key.NODE_ID],
    Stage.UNMASK: [Key.IDS, Key.KIND, Key.SHARES, Key.STAGE, Key.NODE_ID],
}
CASES = [(st, f, i) for st, fs in FIELDS.items() for f in fs for i in range(len(BAD_VALUES) + 1)]


@pytest.mark.parametrize("stage,fld,which", CASES)
def test_fuzz_one_client_every_field_of_every_stage(stage, fld, which):
    """Finding 2: seven kinds of malformed record crashed the whole run. Now any value in any
    field (or a missing field) drops at most that client, and the round goes on."""
    n = 6
    g, nodes, deltas, weights, grid = setup_round(n, n_params=400, seed=40)
    liar = nodes[3]

    def reply(msg):
        if msg.metadata.src_node_id == liar and stage_of(msg) == stage:
            rec = msg.content[RECORD]
            if which == len(BAD_VALUES):
                del rec[fld]
            else:
                rec[fld] = BAD_VALUES[which]
        return msg

    grid.on_reply = reply
    res = secure_aggregate(grid, g, train_messages(nodes, g), with_roster(grid))
    assert res.error is None, res.error
    assert set(res.dropped) <= {liar}
    assert_matches(res, expected_fedavg(g, [x for x in nodes if x not in res.dropped], deltas, weights))


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT, Stage.CONSISTENCY, Stage.UNMASK])
def test_duplicated_and_extra_records_drop_only_the_sender(stage):
    n = 6
    g, nodes, deltas, weights, grid = setup_round(n, n_params=400, seed=41)
    liar = nodes[1]
    real = grid.send_and_receive

    def twice(messages, timeout=None):
        out = list(real(messages, timeout=timeout))
        return out + [r for r in out if r.metadata.src_node_id == liar and stage_of(r) == stage]

    grid.send_and_receive = twice
    res = secure_aggregate(grid, g, train_messages(nodes, g), with_roster(grid))
    assert res.error is None and set(res.dropped) <= {liar}
    assert sum(f"node {liar}" in w for w in res.warnings) == 1
    assert_matches(res, expected_fedavg(g, [x for x in nodes if x not in res.dropped], deltas, weights))


@pytest.mark.parametrize("bad", ["dtype", "shape", "npy", "short-data", "extra-record", "missing", "huge-metrics"])
def test_malformed_masked_vector_drops_only_the_sender(bad):
    n = 6
    g, nodes, deltas, weights, grid = setup_round(n, n_params=400, seed=42)
    liar = nodes[4]

    def reply(msg):
        if msg.metadata.src_node_id == liar and stage_of(msg) == Stage.COLLECT:
            arr = msg.content.array_records[MASKED_RECORD]["masked"]
            vec = np.frombuffer(arr.data, dtype=arr.dtype)
            if bad == "dtype":
                msg.content.array_records[MASKED_RECORD] = ArrayRecord({"masked": ring_array(vec.astype(np.float64))})
            elif bad == "shape":
                msg.content.array_records[MASKED_RECORD] = ArrayRecord({"masked": ring_array(vec[:-1])})
            elif bad == "npy":
                msg.content.array_records[MASKED_RECORD] = ArrayRecord({"masked": Array(vec)})
            elif bad == "short-data":
                arr.data = arr.data[:-8]
            elif bad == "extra-record":
                msg.content.array_records["arrays"] = ArrayRecord({"x": Array(vec)})
            elif bad == "missing":
                del msg.content[MASKED_RECORD]
            else:
                msg.content.metric_records["metrics"].update({f"m{i}": i for i in range(100)})
        return msg

    grid.on_reply = reply
    res = secure_aggregate(grid, g, train_messages(nodes, g), with_roster(grid))
    assert res.error is None and res.dropped == [liar]
    assert sum(f"node {liar}" in w for w in res.warnings) == 1
    assert_matches(res, expected_fedavg(g, [x for x in nodes if x != liar], deltas, weights))


def test_wrong_share_at_unmask_is_tolerated():
    n = 10
    g, nodes, deltas, weights, grid = setup_round(n, n_params=400, seed=43)
    liar = nodes[2]

    def reply(msg):
        if msg.metadata.src_node_id == liar and stage_of(msg) == Stage.UNMASK:
            rec = msg.content[RECORD]
            rec[Key.SHARES] = pack_blobs(s[:2] + bytes(len(s) - 2) for s in unpack_blobs(rec[Key.SHARES]))
        return msg

    grid.on_reply = reply
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert_matches(res, expected_fedavg(g, nodes, deltas, weights))


# --- finding 3: exact promises ------------------------------------------------------------------

@pytest.mark.parametrize("n", list(range(2, 17)) + [25, 40])
def test_recovers_whenever_t_clients_survive(n):
    """Finding 3: 4 clients failed on 1 dropout, 6 on 2. Now any n - t dropouts after key
    sharing, at any stage, recover."""
    rng = np.random.default_rng(n)
    k = resolve_k(n, None)
    t, _ = thresholds(n, k)
    for stage in (Stage.COLLECT, Stage.CONSISTENCY, Stage.UNMASK):
        g, nodes, deltas, weights, grid = setup_round(n, n_params=200, seed=int(rng.integers(1 << 30)))
        gone = set(rng.choice(nodes, size=n - t, replace=False).tolist())
        grid.drop = lambda st, nid, gone=gone, stage=stage: st == stage and nid in gone
        res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
        contributors = [x for x in nodes if x not in gone] if stage == Stage.COLLECT else nodes
        assert_matches(res, expected_fedavg(g, contributors, deltas, weights))


@pytest.mark.parametrize("fail_at", [None, Stage.COLLECT, Stage.UNMASK])
def test_secrets_wiped_when_round_ends_or_aborts(fail_at):
    n = 6
    g, nodes, deltas, weights, grid = setup_round(n, n_params=200, seed=44)
    if fail_at:
        gone = set(nodes[:4])
        grid.drop = lambda st, nid: st == fail_at and nid in gone
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert (res.error is None) == (fail_at is None)
    for nid, ctx in grid.contexts.items():
        assert STATE_RECORD not in ctx.state.config_records, nid


def test_stage_timeout_is_configurable_with_a_default_of_minutes():
    assert 60 <= SecAggConfig().timeout <= 600
    from shared.config import FedConfig
    assert FedConfig().stage_timeout == SecAggConfig().timeout  # deployment
    from simulations.run import for_simulation
    assert for_simulation(FedConfig()).stage_timeout > 3600  # virtual clients queue on a few workers
    assert for_simulation(FedConfig(secagg_timeout=12.5)).stage_timeout == 12.5
    g, nodes, deltas, weights, grid = setup_round(3, n_params=100, seed=45)
    seen = []
    real = grid.send_and_receive
    grid.send_and_receive = lambda m, timeout=None: (seen.append(timeout), real(m, timeout=timeout))[1]
    secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig(timeout=12.5))
    assert seen and set(seen) == {12.5}


def test_dead_nodes_are_logged_as_dropouts():
    n = 6
    g, nodes, deltas, weights, grid = setup_round(n, n_params=200, seed=46)
    dead = nodes[5]
    grid.dead = {dead}
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert res.error is None and res.dropped == [dead]
    assert any(f"node {dead} dropped out" in w for w in res.warnings)
    assert not any("rejected" in w for w in res.warnings)


# --- finding 4: a wrapper around any Flower strategy ----------------------------------------------

def _plain_replies(grid, msgs):
    return [r for r in grid.send_and_receive(msgs) if not r.has_error()]


@pytest.mark.parametrize("name", ["FedAvg", "FedAdam", "FedProx"])
def test_wraps_any_flower_strategy(name):
    import flwr.serverapp.strategy as fs

    n = 5
    g, nodes, deltas, weights, grid = setup_round(n, n_params=400, seed=47)
    cfg = ConfigRecord({"server-round": 1})
    kw = {"fraction_train": 1.0, "min_train_nodes": n, "min_available_nodes": n, "fraction_evaluate": 0.0}
    if name == "FedProx":
        kw["proximal_mu"] = 0.1
    plain, secure = getattr(fs, name)(**kw), SecureAggregation(getattr(fs, name)(**kw))
    msgs = list(plain.configure_train(1, g, cfg, grid))
    expected, _ = plain.aggregate_train(1, _plain_replies(grid, msgs))
    got, result, _ = secure.train_round(grid, 1, g, cfg)
    assert result.error is None
    for k in g.keys():
        np.testing.assert_allclose(got[k].numpy(), expected[k].numpy(), rtol=1e-5, atol=1e-6)
    if name == "FedAdam":  # the wrapped optimizer really stepped: not the plain mean
        mean = expected_fedavg(g, nodes, deltas, weights)
        assert any(not np.allclose(got[k].numpy(), mean[k], atol=1e-6) for k in g.keys())


def test_wrapper_drives_flower_strategy_start():
    import flwr.serverapp.strategy as fs

    n = 4
    g, nodes, deltas, weights, grid = setup_round(n, n_params=400, seed=48)
    kw = {"fraction_train": 1.0, "min_train_nodes": n, "min_available_nodes": n, "fraction_evaluate": 0.0}
    result = SecureAggregation(fs.FedAvg(**kw)).start(grid, g, num_rounds=2,
                                                      train_config=ConfigRecord({"server-round": 1}))
    assert result.arrays is not None
    # the stub applies the same delta each round: two rounds of FedAvg move the model twice
    once = expected_fedavg(g, nodes, deltas, weights)
    for k, a in g.items():
        step = once[k] - a.numpy().astype(np.float64)
        np.testing.assert_allclose(result.arrays[k].numpy(), a.numpy() + 2 * step, atol=1e-5)
    assert all(stage_of(r) is not None for r in grid.replies)  # nothing but secure stages reached clients


class _SlowGrid:
    """Replies become available one pull after another, as from a SuperLink."""

    def __init__(self, replies_per_pull: int, never: int = 0) -> None:
        self.per_pull, self.never, self.pulls, self.pending = replies_per_pull, never, 0, []

    def push_messages(self, messages):
        self.pending = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.pending)

    def pull_messages(self, ids):
        self.pulls += 1
        ready = [i for i in self.pending if i in ids][: self.per_pull]
        ready = [i for i in ready if int(i[1:]) < len(self.pending) - self.never]
        return [type("Reply", (), {"metadata": type("Meta", (), {"reply_to_message_id": i})()})() for i in ready]


def test_stage_replies_are_polled_until_all_arrive_or_the_deadline():
    import time

    from server.secure_aggregation import send_and_receive

    grid = _SlowGrid(replies_per_pull=2)
    got = send_and_receive(grid, [object()] * 5, timeout=30)
    assert sorted(r.metadata.reply_to_message_id for r in got) == ["m0", "m1", "m2", "m3", "m4"]
    assert grid.pulls == 3  # pulled again at once (Flower's deployed grid sleeps 3 s between pulls)
    grid = _SlowGrid(replies_per_pull=5, never=1)  # one node never answers
    start = time.monotonic()
    got = send_and_receive(grid, [object()] * 5, timeout=0.6)
    assert len(got) == 4 and time.monotonic() - start >= 0.6  # waited for it until the deadline, then went on
