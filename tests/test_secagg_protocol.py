"""End-to-end protocol tests: the real server workflow against the real client mod.

:class:`server.inprocess_grid.InProcessGrid` hands every message to the destination node's
``secagg_mod`` with that node's own Context; the only stand-in is local training, which
returns global + a given delta (``tests/helpers.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
from flwr.app import ArrayRecord

import client.secagg_mod as mod
import server.secure_aggregation as sa
from shared.secagg.protocol import resolve_k
sa.resolve_k = resolve_k
from server.secure_aggregation import SecAggConfig, secure_aggregate
from shared.secagg.protocol import (
    RECORD, RING_STYPE, Key, Stage, connected, harary_graph, pack_blobs, pack_ids, ring_array, thresholds,
    unpack_blobs,
    unpack_ids,
)
from helpers import assert_matches, expected_fedavg, setup_round
from server.inprocess_grid import train_messages
from test_secagg_primitives import chi2_uniform_pvalue


@pytest.mark.parametrize("n", [3, 10, 50])
def test_secure_aggregate_equals_fedavg(n):
    declined = ()
    if n >= 10:
        declined = (1000 + 7 * 2,)
    g, nodes, deltas, weights, grid = setup_round(n, n_params=4_000 if n == 50 else 10_000, seed=n, declined=declined)
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert_matches(res, expected_fedavg(g, nodes, deltas, weights, declined))
    assert res.dropped == []
    assert len(res.metrics) == n
    assert sorted(int(m["partition-id"]) for m in res.metrics) == nodes
    assert any(int(m["declined"]) for m in res.metrics) == bool(declined)


def test_all_declined_keeps_global():
    g, nodes, deltas, weights, grid = setup_round(4, declined=tuple(1000 + 7 * i for i in range(4)))
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert res.error is None
    for k, a in g.items():
        assert np.array_equal(res.arrays[k].numpy(), a.numpy())


def test_claimed_weight_is_capped_and_an_oversized_weight_slot_voids_the_round(monkeypatch):
    # an honest client with more examples than the cap counts as the cap
    g, nodes, deltas, weights, grid = setup_round(4)
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig(max_weight=100))
    assert_matches(res, expected_fedavg(g, nodes, deltas, {n: min(w, 100) for n, w in weights.items()}))
    # a client writing 2^20 into its weight slot (bypassing the cap) voids the round, model kept
    g, nodes, deltas, weights, grid = setup_round(4)
    real_encode = mod.encode
    cheat = nodes[1]
    def enc(d, w, fmt):
        v = real_encode(d, w, fmt)
        if w == min(weights[cheat], fmt.max_weight):
            v[-1] = 1 << 20
        return v
    monkeypatch.setattr(mod, "encode", enc)
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig(max_weight=5000))
    assert res.arrays is None and "out of range" in res.error


def test_masked_payload_is_uniform_over_the_ring():
    g, nodes, deltas, weights, grid = setup_round(5, n_params=20_000, seed=3)
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert res.error is None
    payloads = [np.frombuffer(r.content.array_records[mod.MASKED_RECORD]["masked"].data, dtype="<u8")
                for r in grid.replies if mod.MASKED_RECORD in r.content.array_records]
    assert len(payloads) == 5
    for p in payloads:
        assert p.dtype == np.uint64 and p.size == 20_001
        assert chi2_uniform_pvalue(p, 64) > 1e-5


@pytest.mark.parametrize("stage", [Stage.UNMASK, Stage.COLLECT])
def test_dropout_of_n_minus_t_with_complete_graph(stage):
    n = 10
    g, nodes, deltas, weights, grid = setup_round(n, seed=11)
    gone = set(nodes[1:5])  # n - t = 10 - 6
    grid.drop = lambda st, nid: st == stage and nid in gone
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig(neighbours=n - 1))
    contributors = nodes if stage == Stage.UNMASK else [x for x in nodes if x not in gone]
    assert_matches(res, expected_fedavg(g, contributors, deltas, weights))
    assert set(res.dropped) == (set() if stage == Stage.UNMASK else gone)  # dropped = not aggregated


def test_dropout_with_sparse_graph():
    n = 20
    g, nodes, deltas, weights, grid = setup_round(n, seed=12)
    victim = nodes[5]
    grid.drop = lambda st, nid: st == Stage.COLLECT and nid == victim
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert_matches(res, expected_fedavg(g, [x for x in nodes if x != victim], deltas, weights))
    assert res.dropped == [victim]


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.COLLECT, Stage.UNMASK])
def test_too_few_survivors_fails_cleanly_and_next_round_proceeds(stage):
    n = 10
    g, nodes, deltas, weights, grid = setup_round(n, seed=13)
    gone = set(nodes[:5])  # one more than n - t
    grid.drop = lambda st, nid: st == stage and nid in gone
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig(neighbours=n - 1))
    assert res.arrays is None and res.error
    if stage != Stage.UNMASK:
        assert set(res.dropped) >= gone
    grid.drop = lambda st, nid: False
    res2 = secure_aggregate(grid, g, train_messages(nodes, g, server_round=2), SecAggConfig(neighbours=n - 1))
    assert_matches(res2, expected_fedavg(g, nodes, deltas, weights))


def test_unrecoverable_sparse_neighbourhood_fails_cleanly():
    n = 20
    g, nodes, deltas, weights, grid = setup_round(n, seed=14)
    k = sa.resolve_k(n, None)
    t, t_local = thresholds(n, k)
    gone = set(nodes[: n - t + 1])
    grid.drop = lambda st, nid: st == Stage.COLLECT and nid in gone
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert res.arrays is None and "threshold" in res.error


def _collect_msgs_tamper(grid, node, fn):
    def deliver(msg):
        rec = msg.content.config_records.get(RECORD)
        if rec is not None and rec[Key.STAGE] == Stage.COLLECT and msg.metadata.dst_node_id == node:
            src, ct = fn(unpack_ids(rec[Key.SRC]), unpack_blobs(rec[Key.CT]))
            rec[Key.SRC], rec[Key.CT] = pack_ids(src), pack_blobs(ct)
        return msg
    grid.on_deliver = deliver


def test_tampered_share_ciphertext_rejected_by_client():
    g, nodes, deltas, weights, grid = setup_round(5, seed=15)
    target = nodes[0]
    def flip(src, ct):
        bad = bytearray(ct[0]); bad[-1] ^= 0x01
        return src, [bytes(bad)] + ct[1:]
    _collect_msgs_tamper(grid, target, flip)
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert_matches(res, expected_fedavg(g, nodes, deltas, weights))  # one share lost is tolerated
    assert any(f"node {target} rejected shares" in w for w in res.warnings)


def test_replayed_share_ciphertexts_rejected():
    g, nodes, deltas, weights, grid = setup_round(4, seed=16)
    target = nodes[1]
    captured = {}
    _collect_msgs_tamper(grid, target, lambda src, ct: (captured.setdefault("r1", (src, ct)), (src, ct))[1])
    assert secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig()).error is None
    old_src, old_ct = captured["r1"]
    # Round 2: replay round-1 ciphertexts in place of fresh ones, and a duplicate within the round.
    _collect_msgs_tamper(grid, target, lambda src, ct: ([old_src[0]] + src + [src[0]], [old_ct[0]] + ct + [ct[0]]))
    res = secure_aggregate(grid, g, train_messages(nodes, g, server_round=2), SecAggConfig())
    assert res.error is None
    rejected = [unpack_ids(r.content[RECORD][Key.REJECTED]) for r in grid.replies[-20:]
                if r.has_content() and r.content[RECORD].get(Key.STAGE) == Stage.COLLECT
                and r.metadata.src_node_id == target]
    assert len(rejected[-1]) == 2 and set(rejected[-1]) <= set(old_src) | set(nodes)


def test_node_claiming_another_id_is_rejected():
    g, nodes, deltas, weights, grid = setup_round(6, seed=17)
    liar, victim = nodes[2], nodes[3]
    def reply(msg):
        if msg.metadata.src_node_id == liar and msg.has_content():
            msg.content[RECORD][Key.NODE_ID] = victim
        return msg
    grid.on_reply = reply
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert_matches(res, expected_fedavg(g, [x for x in nodes if x != liar], deltas, weights))
    assert res.dropped == [liar]
    assert any("claimed node id" in w for w in res.warnings)


def test_reply_with_forged_source_is_rejected():
    g, nodes, deltas, weights, grid = setup_round(6, seed=18)
    liar, victim = nodes[4], nodes[0]
    def reply(msg):
        if msg.metadata.src_node_id == liar:
            msg.metadata.__dict__["_src_node_id"] = victim
        return msg
    grid.on_reply = reply
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert_matches(res, expected_fedavg(g, [x for x in nodes if x != liar], deltas, weights))
    assert liar in res.dropped and victim not in res.dropped


def test_client_refuses_misdelivered_or_out_of_order_messages():
    g, nodes, deltas, weights, grid = setup_round(3, seed=19)
    def deliver(msg):
        rec = msg.content.config_records.get(RECORD)
        if rec is not None and rec[Key.STAGE] == Stage.SHARE_KEYS and msg.metadata.dst_node_id == nodes[0]:
            rec[Key.STAGE] = Stage.UNMASK
        return msg
    grid.on_deliver = deliver
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig(threshold=2))
    assert nodes[0] in res.dropped
    assert any("not allowed after" in w for w in res.warnings)


def test_server_never_holds_an_unmasked_individual_update(monkeypatch):
    g, nodes, deltas, weights, grid = setup_round(6, n_params=3_000, seed=20, declined=(1000 + 7 * 5,))
    quantized = []
    real_encode = mod.encode
    def spy_encode(delta, weight, fmt):
        q = real_encode(delta, weight, fmt)
        quantized.append(q.copy())
        return q
    monkeypatch.setattr(mod, "encode", spy_encode)

    seen = []
    class SpyAccumulator(sa.RingAccumulator):
        def add_masked(self, node, vec):
            seen.append(vec.copy())
            super().add_masked(node, vec)
            seen.append(self.value.copy())
        def remove_mask(self, seed, sign):
            super().remove_mask(seed, sign)
            seen.append(self.value.copy())
        def remove_masks(self, seeds):  # one at a time, so every intermediate value is inspected
            for seed, sign in seeds:
                self.remove_mask(seed, sign)
    monkeypatch.setattr(sa, "RingAccumulator", SpyAccumulator)

    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert res.error is None and len(quantized) == 6
    total = np.sum(quantized, axis=0, dtype=np.uint64)
    assert np.array_equal(seen[-1], total), "instrumentation must see the unmasked aggregate"
    for arr in seen[:-1]:
        for q in quantized:
            assert np.mean(arr == q) < 0.01
    # Nothing else from clients carries an update: no float arrays, only masked ring vectors.
    for r in grid.replies:
        if not r.has_content():
            continue
        assert "arrays" not in r.content.array_records
        for name, rec in r.content.array_records.items():
            for arr in rec.values():
                assert arr.stype == RING_STYPE and arr.dtype == "<u8"
                v = np.frombuffer(arr.data, dtype="<u8")
                assert all(np.mean(v == q) < 0.01 for q in quantized)


def test_update_outside_declared_bound_is_clipped_and_an_out_of_range_sum_voids_the_round(monkeypatch):
    g, nodes, deltas, weights, grid = setup_round(5, seed=21, big=1000 + 7 * 3)
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig(update_bound=1.0))
    assert res.error is None  # the honest client clipped its update to the bound
    clipped = {n: {k: np.clip(v, -1.0, 1.0) for k, v in d.items()} for n, d in deltas.items()}
    assert_matches(res, expected_fedavg(g, nodes, clipped, weights))
    # a client that writes past the bound (no clipping, straight into the ring) voids the round
    real_encode = mod.encode
    def enc(d, w, fmt):
        v = real_encode(d, w, fmt)
        if w == weights[nodes[2]]:
            v[0] = np.uint64(1 << 62)
        return v
    monkeypatch.setattr(mod, "encode", enc)
    res = secure_aggregate(grid, g, train_messages(nodes, g, 2), SecAggConfig(update_bound=1.0))
    assert res.arrays is None and "out of range" in res.error


@pytest.mark.parametrize("n", [2, 10, 50, 100, 128])
def test_equal_weights_pick_a_32_bit_ring_where_n_maximal_clients_cannot_wrap(n):
    """Under DP every owner weighs 1 (W = 1): up to 128 clients fit a 32-bit ring with 24 bits of
    resolution, and the sum of n honest clients at the clip bound decodes exactly, no wrap."""
    from shared.secagg.quantize import choose_format, decode_sum, encode_clipped, to_signed

    fmt = choose_format(n, max_weight=1)  # what SecAggConfig(equal_weights=True) asks for
    assert fmt.bits == 32 and fmt.dtype == np.uint32
    worst = encode_clipped(np.array([np.inf, -np.inf, 1e30, -1e30, np.nan, fmt.clip]), 5, fmt)
    lim = int(to_signed(worst, 32)[0])
    assert lim == fmt.clip * fmt.scale and list(to_signed(worst, 32)) == [lim, -lim, lim, -lim, 0, lim, 1]
    assert n * lim <= 1 << 30  # a spare bit below the sign bit of the 32-bit ring
    acc = np.zeros_like(worst)
    for _ in range(n):
        acc += worst  # uint32 arithmetic: wraps mod 2^32 exactly as the ring does
    wsum, total = decode_sum(acc, fmt, n)
    assert total == n
    assert list(wsum) == [n * fmt.clip, -n * fmt.clip, n * fmt.clip, -n * fmt.clip, 0.0, n * fmt.clip]
    assert choose_format(n + 129, max_weight=1).bits == 64  # beyond 128 clients: the 64-bit ring


def _add_to_masked(grid, node, index, value):
    """``node`` adds ``value`` to element ``index`` of its masked vector (past any clipping):
    masks cancel in the sum, so the unmasked sum carries it."""
    def reply(msg):
        if msg.metadata.src_node_id == node and msg.has_content() and mod.MASKED_RECORD in msg.content:
            arr = msg.content[mod.MASKED_RECORD]["masked"]
            vec = np.frombuffer(arr.data, dtype=arr.dtype).copy()
            vec[index] = (int(vec[index]) + value) % (1 << 8 * vec.itemsize)
            msg.content[mod.MASKED_RECORD] = ArrayRecord({"masked": ring_array(vec)})
        return msg
    grid.on_reply = reply


@pytest.mark.parametrize("index,value", [(0, 1 << 30), (5, -(1 << 30)), (-1, 1)])
def test_equal_weights_round_is_exact_and_an_out_of_range_sum_voids_it(index, value):
    """32-bit ring under equal weights: honest rounds equal unweighted FedAvg; a client pushing a
    coordinate out of range (+-2^30) or claiming weight 2 in the weight slot voids the round."""
    g, nodes, deltas, weights, grid = setup_round(6, seed=31)
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig(equal_weights=True))
    assert res.error is None and res.total_weight == 6
    assert res.quantization_error <= 1e-6
    assert_matches(res, expected_fedavg(g, nodes, deltas, dict.fromkeys(nodes, 1)))
    assert all(np.frombuffer(r.content[mod.MASKED_RECORD]["masked"].data, dtype="<u4").size == 2_001
               for r in grid.replies if r.has_content() and mod.MASKED_RECORD in r.content)
    _add_to_masked(grid, nodes[3], index, value)
    res = secure_aggregate(grid, g, train_messages(nodes, g, 2), SecAggConfig(equal_weights=True))
    assert res.arrays is None and "out of range" in res.error


def test_single_client_round_is_refused():
    g, nodes, deltas, weights, grid = setup_round(1)
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert res.arrays is None and res.error


def test_non_secagg_messages_pass_through():
    g, nodes, deltas, weights, grid = setup_round(1)
    msg = train_messages(nodes, g)[0]
    called = []
    def nxt(m, c):
        called.append(m)
        return m
    assert mod.secagg_mod(msg, grid.contexts[nodes[0]], nxt) is msg and called == [msg]


def test_harary_graph_is_k_regular_and_connected_by_construction():
    import os as _os
    for n in range(2, 41):
        k = sa.resolve_k(n, None)
        for _ in range(25):
            graph = harary_graph(list(range(100, 100 + n)), k, _os.urandom(16))
            assert all(len(v) == k and i not in v for i, v in graph.items())
            assert all(i in graph[j] for i, v in graph.items() for j in v)
            assert connected(graph, set(graph))
    # k-connected: removing any f < k nodes keeps it connected (random subsets, many seeds)
    rng = np.random.default_rng(0)
    for n in (8, 13, 50, 100):
        k = sa.resolve_k(n, None)
        t, t_local = thresholds(n, k)
        for _ in range(200):
            graph = harary_graph(list(range(n)), k, rng.bytes(16))
            gone = set(rng.choice(n, size=n - t, replace=False).tolist())
            assert connected(graph, set(range(n)) - gone)


def test_client_enforced_thresholds():
    for n in range(2, 200):
        k = sa.resolve_k(n, None)
        t, t_local = thresholds(n, k)
        assert t > n / 2 and 2 * t_local > k + 1 and t_local <= k + 1
        assert thresholds(n, k, t_request=2) == (t, t_local)  # a server cannot lower them
        assert thresholds(n, k, min_fraction=0.9)[0] >= 0.9 * n  # an owner can raise them


def test_through_a_real_flower_clientapp():
    from flwr.clientapp import ClientApp

    g, nodes, deltas, weights, grid = setup_round(4, seed=22)
    apps = {}
    for nid in nodes:
        app = ClientApp(mods=[mod.secagg_mod])
        app.train()(grid.trains[nid])
        apps[nid] = app
    grid.mod = lambda msg, ctx, _train: apps[ctx.node_id](msg, ctx)
    res = secure_aggregate(grid, g, train_messages(nodes, g), SecAggConfig())
    assert_matches(res, expected_fedavg(g, nodes, deltas, weights))
