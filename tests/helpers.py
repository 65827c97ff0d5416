"""Round set-up and checks that the secure-aggregation test files share, so that
test_secagg_security need not import test_secagg_protocol.

The in-process Grid itself is `server.inprocess_grid`: the secure-aggregation benchmark
uses it too.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from server.inprocess_grid import InProcessGrid, make_train


def setup_round(n, n_params=2_000, seed=0, declined=(), big=None, base_id=1000):
    """(global arrays, node ids, per-node deltas, per-node weights, grid) of one protocol round
    whose clients reply global + delta; `big` gets one huge value (overflow tests)."""
    rng = np.random.default_rng(seed)
    shapes = {"q.lora_B": (n_params // 4 // 8, 8), "v.lora_B": (n_params - n_params // 4 // 8 * 8,)}
    g = ArrayRecord({k: Array((rng.standard_normal(s) * 0.05).astype(np.float32)) for k, s in shapes.items()})
    nodes = [base_id + 7 * i for i in range(n)]
    deltas, weights = {}, {}
    for i, nid in enumerate(nodes):
        deltas[nid] = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
        if nid == big:
            deltas[nid]["v.lora_B"][0] = 1e4
        weights[nid] = int(rng.integers(1, 5000))
    trains = {nid: make_train(deltas[nid], weights[nid], declined=nid in declined) for nid in nodes}
    return g, nodes, deltas, weights, InProcessGrid(trains)


def expected_fedavg(g, nodes, deltas, weights, declined=()):
    """Plain weighted FedAvg of the same round in float64: what secure aggregation must equal."""
    total = sum(weights[n] for n in nodes if n not in declined)
    out = {}
    for k, a in g.items():
        ga = a.numpy().astype(np.float64)
        if total == 0:
            out[k] = ga
            continue
        acc = np.zeros_like(ga)
        for n in nodes:
            if n in declined:
                continue
            local = (a.numpy() + deltas[n][k]).astype(np.float32).astype(np.float64)
            acc += weights[n] * (local - ga)
        out[k] = ga + acc / total
    return out


def assert_matches(res, expected):
    """The secure result equals `expected` up to its reported quantization error."""
    assert res.error is None, res.error
    assert res.quantization_error < 1e-6
    for k, exp in expected.items():
        got = res.arrays[k].numpy()
        assert got.dtype == np.float32 and got.shape == exp.shape
        tol = res.quantization_error + np.spacing(np.abs(exp).astype(np.float32)).astype(np.float64)
        assert np.all(np.abs(got.astype(np.float64) - exp) <= tol), np.max(np.abs(got - exp))
