"""Benchmark: secure aggregation vs plain FedAvg vs flwr's SecAgg+, all measured in one run.

Runs the real server workflow (``server.secure_aggregation``) against the real client mod
(``client.secagg_mod``) through :class:`server.inprocess_grid.InProcessGrid`, a Grid whose ``send_and_receive``
hands each message to the destination node's mod with that node's own Context. The local
"training" of the micro-benchmark is a stub that returns global + a fixed random delta, so its
table isolates the aggregation cost: the ratio is the worst case. It is timed for each client
weighting (``--weights``): equal weights, as under DP (the app's default; W = 1 fits a 32-bit
ring up to 128 clients), and example counts (non-DP; a 64-bit ring). The second table runs real
rounds: the app's own ClientApp ``train`` (tiny-bert, local data partitions) behind plain
FedAvg, this protocol and flwr's SecAgg+ (flwr's ``secaggplus_mod`` + ``SecAggPlusWorkflow``);
its tiny-bert adapter (578 values) and 32 examples per client make training as short as it
gets, so its ratios are the worst case for a real round. Every ratio is against plain FedAvg in
the same run, in wall time and in this process's CPU time (see :class:`Cost`).

    python -m simulations.bench_secagg [--params 150000] [--clients 10 50 100] [--real-clients 10 50 100]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from server.inprocess_grid import InProcessGrid, TrainFn, make_train, train_messages
from server.secure_aggregation import SecAggConfig, secure_aggregate
from shared.quiet import offline_and_quiet
from shared.secagg import masks
from shared.secagg.protocol import resolve_k


def plain_fedavg(grid: Grid, global_arrays: ArrayRecord, msgs: list[Message]) -> ArrayRecord:
    """Reference FedAvg over the same grid: what the app does without secure aggregation."""
    replies = [r for r in grid.send_and_receive(msgs) if not r.has_error()]
    total, acc = 0, None
    for r in replies:
        w = int(r.content["metrics"]["num-examples"])
        if w == 0:
            continue
        arrs = [a.numpy().astype(np.float64) for a in r.content["arrays"].values()]
        acc = [x * w for x in arrs] if acc is None else [s + x * w for s, x in zip(acc, arrs)]
        total += w
    if acc is None:
        return global_arrays
    return ArrayRecord({k: Array((s / total).astype(np.float32)) for k, s in zip(global_arrays.keys(), acc)})


def adapter(n_params: int, rng: np.random.Generator) -> ArrayRecord:
    """A LoRA-like set of tensors totalling ``n_params`` float32 values."""
    shapes, left, i = {}, n_params, 0
    while left > 0:
        size = min(left, 384 * 64)
        shapes[f"layer{i}.lora_B"] = (size // 64, 64) if size % 64 == 0 else (size,)
        left -= size
        i += 1
    return ArrayRecord({k: Array((rng.standard_normal(s) * 0.02).astype(np.float32)) for k, s in shapes.items()})


class Cost(NamedTuple):
    """Wall seconds and this process's CPU seconds (all threads) of one round. On a shared
    machine other jobs stretch wall times unevenly between variants; CPU time counts only the
    work done, including the mask threads', so both ratios are printed."""

    wall: float
    cpu: float

    def best(self, other: "Cost") -> "Cost":
        return Cost(min(self.wall, other.wall), min(self.cpu, other.cpu))


WORST = Cost(math.inf, math.inf)
SKIPPED = Cost(math.nan, math.nan)


@contextmanager
def clock():
    """``with clock() as c: ...`` then ``c[0]`` is the block's :class:`Cost`."""
    out: list[Cost] = []
    w0, c0 = time.perf_counter(), time.process_time()
    yield out
    out.append(Cost(time.perf_counter() - w0, time.process_time() - c0))


WEIGHTS = {"equal": "each client weighs 1, as under DP (the app's default): W = 1, a 32-bit ring up to 128 "
                    "clients", "examples": "example counts as weights (non-DP runs): W = 16384, a 64-bit ring"}


def _round(n: int, n_params: int, secure: bool, rng: np.random.Generator,
           weights: str = "examples") -> tuple[Cost, float]:
    g = adapter(n_params, rng)
    deltas = {k: (rng.standard_normal(a.shape) * 1e-3).astype(np.float32) for k, a in g.items()}
    nodes = list(range(100, 100 + n))
    equal = weights == "equal"
    grid = InProcessGrid({nid: make_train(deltas, 1 if equal else 100 + nid) for nid in nodes})
    msgs = train_messages(nodes, g)
    with clock() as cost:
        if secure:
            res = secure_aggregate(grid, g, msgs, SecAggConfig(equal_weights=equal))
            assert res.error is None, res.error
        else:
            plain_fedavg(grid, g, msgs)
    return cost[0], grid.client_seconds


def flwr_secaggplus_round(n: int, n_params: int, rng: np.random.Generator) -> Cost:
    """flwr's own SecAggPlusWorkflow + secaggplus_mod on the same in-process grid and workload.

    ``num_shares`` is our k + 1 made odd (flwr needs odd), threshold 2/3 of the shares.
    """
    import flwr.compat.common.recorddict_compat as compat
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    g = adapter(n_params, rng)
    deltas = [(rng.standard_normal(a.shape) * 1e-3).astype(np.float32) for a in g.values()]
    nodes = list(range(100, 100 + n))

    def make(nid: int) -> TrainFn:
        def train(msg: Message, context: Context) -> Message:
            fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
            from flwr.common import parameters_to_ndarrays
            arrs = [a + d for a, d in zip(parameters_to_ndarrays(fitins.parameters), deltas)]
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrs), 100 + nid, {})
            return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
        return train

    grid = InProcessGrid({nid: make(nid) for nid in nodes}, mod=secaggplus_mod)
    return _time_flwr_secaggplus(grid, nodes, g)


def mask_throughput(n_params: int, reps: int = 5) -> tuple[float, float]:
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    nbytes = n_params * 8
    t0 = time.perf_counter()
    for _ in range(reps):
        masks.mask(os.urandom(32), n_params, 64)
    ours = reps * nbytes / (time.perf_counter() - t0) / 1e6
    t0 = time.perf_counter()
    for _ in range(reps):
        pseudo_rand_gen(os.urandom(32), 1 << 32, [(n_params,)])
    theirs = reps * nbytes / (time.perf_counter() - t0) / 1e6
    return ours, theirs


def flwr_mask_cost(n: int, n_params: int) -> float:
    """flwr SecAgg+ mask work for one round: per client 1 self + k pairwise masks, and the
    server regenerating n self masks, all via ``pseudo_rand_gen`` (k as in our round)."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    k = resolve_k(n, None)
    shape = [(n_params,)]
    t0 = time.perf_counter()
    for _ in range(n * (k + 1) + n):
        pseudo_rand_gen(os.urandom(32), 1 << 32, shape)
    return time.perf_counter() - t0


def ours_mask_cost(n: int, n_params: int) -> float:
    k = resolve_k(n, None)
    acc = np.zeros(n_params + 1, dtype=np.uint64)
    t0 = time.perf_counter()
    for _ in range(n * (k + 1) + n):
        masks.add_mask(acc, os.urandom(32), 64)
    return time.perf_counter() - t0


# --- real training rounds ------------------------------------------------------------------------

def _real_setup(n: int, examples: int, dp: bool = False):
    """tiny-bert, one synthetic brand per client, the app's own ClientApp ``train``.

    DP is off by default: Opacus' noise calibration costs seconds per client, which would hide
    the aggregation overhead and make the ratio trivially ~1 (``--real-dp`` turns it on)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from shared.config import FedConfig
    from shared.lora import cached_model, load_trainable_state, trainable_state
    from shared.data import load_federation, with_labels
    from shared.params import to_record

    out = tempfile.mkdtemp(prefix="fedlora-bench-")
    cfg = FedConfig(model="tiny-bert", brands=n, num_clients=n, examples_per_brand=examples, test_size=n,
                    rounds=1, batch_size=16, lr=5e-3, max_length=32, output=out, delta=1e-3, dp=dp)
    fed = load_federation(cfg)
    cfg = with_labels(cfg, fed)
    model, _ = cached_model(cfg, len(fed.labels))
    load_trainable_state(model, model.fedlora_initial_state)
    return cfg, to_record(trainable_state(model))


def _real_contexts(grid: "InProcessGrid", nodes: list[int]) -> None:
    for pid, nid in enumerate(nodes):
        grid.contexts[nid].node_config["partition-id"] = pid


def real_round(n: int, variant: str, examples: int, dp: bool = False) -> Cost:
    """One round of real local training at n clients: plain FedAvg, ours, or flwr's SecAgg+."""
    from client.client_app import train as client_train

    cfg, g = _real_setup(n, examples, dp)
    nodes = list(range(100, 100 + n))
    run_cfg = {**cfg.to_run_config(), "server-round": 1}
    if variant == "flwr":
        return _flwr_real_round(n, nodes, g, run_cfg, client_train)
    grid = InProcessGrid({nid: client_train for nid in nodes})
    _real_contexts(grid, nodes)
    msgs = [Message(RecordDict({"arrays": g, "config": ConfigRecord(run_cfg)}), dst_node_id=nid,
                    message_type=MessageType.TRAIN, group_id="1") for nid in nodes]
    with clock() as cost:
        if variant == "ours":
            res = secure_aggregate(grid, g, msgs, SecAggConfig(equal_weights=dp))  # as the app: DP -> W = 1
            assert res.error is None and not res.dropped, (res.error, res.dropped)
        else:
            replies = [r for r in grid.send_and_receive(msgs) if not r.has_error()]
            from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
            trained = [r.content for r in replies if _weight(r.content) > 0]
            assert len(trained) == n, f"{n - len(trained)} of {n} plain clients did not train"
            for content in trained:  # under DP no count leaves the client: each owner weighs 1, as in ours
                content["metrics"]["num-examples"] = _weight(content)
            aggregate_arrayrecords(trained, "num-examples")
    return cost[0]


def _weight(content: RecordDict) -> int:
    """A reply's FedAvg weight: its example count, 1 under DP (no count is reported), 0 if it
    declined or sent no arrays."""
    metrics = content["metrics"]
    if int(metrics.get("declined", 0)) or not len(content.get("arrays", ())):
        return 0
    return int(metrics.get("num-examples", 1))


def _flwr_real_round(n, nodes, g, run_cfg, client_train) -> Cost:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    keys = list(g.keys())

    def train(msg: Message, context: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        arrays = ArrayRecord({k: Array(a) for k, a in zip(keys, parameters_to_ndarrays(fitins.parameters))})
        inner = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(run_cfg)}),
                        dst_node_id=context.node_id, message_type=MessageType.TRAIN, group_id="1")
        reply = client_train(inner, context)
        weight = _weight(reply.content)  # a declined owner sends the global back with weight 0
        out = [(reply.content["arrays"] if weight else arrays)[k].numpy() for k in keys]
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(out), weight, {})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    grid = InProcessGrid({nid: train for nid in nodes}, mod=secaggplus_mod)
    _real_contexts(grid, nodes)
    return _time_flwr_secaggplus(grid, nodes, g)


def _time_flwr_secaggplus(grid, nodes: list[int], g) -> Cost:
    """One round of Flower's own SecAgg+ workflow over `grid`, with shares sized like ours."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import ndarrays_to_parameters
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WKey

    n = len(nodes)
    cm = SimpleClientManager()
    for nid in nodes:
        cm.register(GridClientProxy(nid, grid, 1))
    ctx = LegacyContext(Context(1, 1, {}, RecordDict(), {}),
                        strategy=FedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n),
                        client_manager=cm)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WKey.CURRENT_ROUND: 1})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([a.numpy() for a in g.values()]), keep_input=True)
    shares = resolve_k(n, None) + 1
    shares += 1 - shares % 2
    wf = SecAggPlusWorkflow(num_shares=min(shares, n) if shares < n else 1.0,
                            reconstruction_threshold=max(2, math.ceil(2 * min(shares, n) / 3)))
    before = ctx.state[MAIN_PARAMS_RECORD]
    with clock() as cost:
        wf(grid, ctx)
    if ctx.state[MAIN_PARAMS_RECORD] is before:  # a halted workflow only logs; never time a round that did nothing
        raise RuntimeError(f"Flower's SecAgg+ halted before aggregating ({n} clients); see its log")
    return cost[0]


def _ratios(cost: Cost, plain: Cost) -> str:
    return f"{cost.wall:>8.2f} {cost.wall / plain.wall:>6.2f} {cost.cpu / plain.cpu:>6.2f}"


def main_real(clients: list[int], examples: int, skip_flwr: bool, dp: bool = False, reps: int = 1) -> None:
    print(f"\nreal training rounds (tiny-bert, {'DP-SGD' if dp else 'no DP'}, {examples} examples per client, "
          f"best of {reps}; ratios against plain FedAvg measured in this run, wall and CPU)")
    print(f"{'clients':>7} {'plain s':>8} {'ours s':>8} {'ratio':>6} {'cpu':>6} {'flwr s':>8} {'ratio':>6} {'cpu':>6}")
    for n in clients:
        real_round(min(n, 4), "plain", examples, dp)  # warm the model cache and imports
        plain = ours = flwr_t = WORST
        for _ in range(reps):  # interleaved, so load from other processes hits all variants alike
            plain = plain.best(real_round(n, "plain", examples, dp))
            ours = ours.best(real_round(n, "ours", examples, dp))
            flwr_t = SKIPPED if skip_flwr else flwr_t.best(real_round(n, "flwr", examples, dp))
        print(f"{n:>7} {plain.wall:>8.2f} {_ratios(ours, plain)} {_ratios(flwr_t, plain)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=int, default=150_000, help="adapter size (minilm FFA-LoRA ~150k)")
    ap.add_argument("--large-params", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--large-clients", type=int, nargs="*", default=[10, 50])
    ap.add_argument("--skip-flwr", action="store_true", help="skip flwr's full SecAgg+ round")
    ap.add_argument("--real-clients", type=int, nargs="*", default=[10, 50, 100],
                    help="client counts for the real-training rounds (none: skip them)")
    ap.add_argument("--real-examples", type=int, default=32, help="examples per client in the real rounds")
    ap.add_argument("--weights", nargs="+", choices=sorted(WEIGHTS), default=["equal", "examples"],
                    help="client weighting(s) in the micro-benchmark, each a row (equal: as under DP)")
    ap.add_argument("--micro-reps", type=int, default=3, help="micro-benchmark repetitions (best of)")
    ap.add_argument("--real-reps", type=int, default=3, help="real-round repetitions (best of)")
    ap.add_argument("--real-dp", action="store_true", help="DP-SGD in the real rounds (slow noise calibration)")
    args = ap.parse_args()
    offline_and_quiet()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # Flower's SecAgg+ logs every node's every stage
    rng = np.random.default_rng(0)
    rows = [(n, args.params) for n in args.clients] + [(n, args.large_params) for n in args.large_clients]
    for w in args.weights:
        print(f"weights {w}: {WEIGHTS[w]}")
    print(f"{'clients':>7} {'params':>9} {'k':>3} {'weights':>8} {'plain s':>8} {'ours s':>8} {'ratio':>6} {'cpu':>6} "
          f"{'flwr s':>8} {'ratio':>6} {'cpu':>6} {'ours client s/node':>18} {'ours server s':>13} "
          f"{'ours masks s':>12} {'flwr masks s':>12}")
    for n, p in rows:
        plain, flwr_full = WORST, WORST
        sec = dict.fromkeys(args.weights, WORST)
        client = dict.fromkeys(args.weights, 0.0)
        for _ in range(args.micro_reps):  # interleaved, so load from other processes hits all alike
            plain = plain.best(_round(n, p, False, rng)[0])
            for w in args.weights:
                t, c = _round(n, p, True, rng, w)
                if t.wall < sec[w].wall:
                    client[w] = c
                sec[w] = sec[w].best(t)
            flwr_full = SKIPPED if args.skip_flwr else flwr_full.best(flwr_secaggplus_round(n, p, rng))
        ours_m = ours_mask_cost(n, p)
        flwr_m = flwr_mask_cost(n, p)
        for w in args.weights:
            print(f"{n:>7} {p:>9} {resolve_k(n, None):>3} {w:>8} {plain.wall:>8.3f} {_ratios(sec[w], plain)} "
                  f"{_ratios(flwr_full, plain)} {client[w] / n:>18.4f} {sec[w].wall - client[w]:>13.3f} "
                  f"{ours_m:>12.3f} {flwr_m:>12.3f}", flush=True)
    ours, theirs = mask_throughput(args.params)
    print(f"\nmask generation throughput ({args.params} uint64 elements): ours AES-128-CTR {ours:,.0f} MB/s, "
          f"flwr pseudo_rand_gen {theirs:,.0f} MB/s ({ours / theirs:.1f}x)")
    if args.real_clients:
        main_real(args.real_clients, args.real_examples, args.skip_flwr, args.real_dp, args.real_reps)


if __name__ == "__main__":
    main()
