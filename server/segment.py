"""Server side of federated k-means (`fedlora segment`): it only ever holds centroids and sums.

Releases (each one secure-aggregation round when `secure_agg` is on, through the same
`secure_aggregate` training uses, with equal weights so no row count leaves an owner):

1. the federated mean: one "cluster" whose noisy sum and count give the data's mean mu;
   the initial centroids are mu plus k orthogonal random offsets of the data's RMS spread
   (`shared.segment.centered_init`), a k-means++-like spread that touches no raw point;
2. `segment_rounds` Lloyd rounds: noisy per-cluster sums and counts -> new centroids, each
   noisy mean shrunk towards mu by how much of it the (public) noise level explains.

Then the final centroids go to every owner, which writes its own segments locally. Each
owner's noise, schedule and ledger are its own (client/segment.py); the server's seed only
picks the public initial directions.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from rich.console import Console

from client.segment import CENTROIDS_RECORD, SEGMENT_RECORD, STATS_KEY
from shared.config import FedConfig
from shared.segment import (
    SENSITIVITY, centered_init, initial_directions, min_count, noise_schedule, update_centroids,
)


@dataclass
class SegmentRun:
    centroids: np.ndarray
    rounds: list[dict] = field(default_factory=list)
    clients: dict[str, dict] = field(default_factory=dict)
    owners_written: int = 0


def _wait_for_nodes(grid: Grid, num_nodes: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= num_nodes or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


def _messages(nodes: list[int], cfg: FedConfig, server_round: int, stage: str, release: int, releases: int,
              centroids: np.ndarray) -> list[Message]:
    k, d = centroids.shape
    content = {
        "arrays": ArrayRecord({STATS_KEY: Array(np.zeros(k * d + k))}),  # secure aggregation adds deltas to this
        CENTROIDS_RECORD: ArrayRecord({CENTROIDS_RECORD: Array(np.ascontiguousarray(centroids, dtype=np.float64))}),
        "config": ConfigRecord({**cfg.to_run_config(), "server-round": server_round}),
        SEGMENT_RECORD: ConfigRecord({"stage": stage, "release": release, "releases": releases}),
    }
    return [Message(RecordDict(dict(content)), dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(server_round))
            for nid in nodes]


def _aggregate(grid: Grid, cfg: FedConfig, messages: list[Message], length: int) -> tuple[np.ndarray | None, int, list[dict], str | None]:
    """(sum of the owners' released statistics or None, contributors, reply metrics, error)."""
    if cfg.secure_agg:
        from server.secure_aggregation import SecAggConfig, secure_aggregate
        from shared.segment import STATS_BOUND

        result = secure_aggregate(grid, messages[0].content["arrays"], messages, SecAggConfig(
            threshold=cfg.secagg_threshold or None, neighbours=cfg.secagg_neighbours or None,
            timeout=cfg.stage_timeout, update_bound=STATS_BOUND, equal_weights=True, bits=64))
        metrics = [dict(m) for m in result.metrics]
        if result.error or result.arrays is None or result.total_weight <= 0:
            return None, 0, metrics, result.error or "no owner contributed"
        # the mean of equal-weight deltas from zero, times the number of contributors: the sum
        return result.arrays[STATS_KEY].numpy().astype(np.float64) * result.total_weight, result.total_weight, metrics, None
    total, n, metrics = np.zeros(length), 0, []
    for reply in grid.send_and_receive(messages, timeout=cfg.stage_timeout):
        if reply.has_error():
            continue
        m = dict(reply.content["metrics"])
        m["node-id"] = int(reply.metadata.src_node_id)
        metrics.append(m)
        arrays = reply.content.array_records.get("arrays")
        if m.get("declined", 0) or arrays is None or STATS_KEY not in arrays:
            continue
        stats = arrays[STATS_KEY].numpy()
        if stats.shape != (length,) or not np.isfinite(stats).all():
            continue  # a malformed reply is left out, as secure aggregation drops it
        total += stats
        n += 1
    return (total if n else None), n, metrics, (None if n else "no owner contributed")


def run_segment(grid: Grid, cfg: FedConfig, num_nodes: int, dim: int, console: Console | None = None) -> SegmentRun:
    """The whole federated k-means: mean, Lloyd rounds, final broadcast. Writes `centroids.npy`."""
    console = console or Console()
    k = cfg.segment_k
    releases = cfg.segment_rounds + 1
    # public schedule, for the server's own post-processing only (owners use their own, maybe tighter)
    zs = noise_schedule(cfg.segment_epsilon, cfg.delta, releases) if cfg.dp else [0.0] * releases
    nodes = _wait_for_nodes(grid, num_nodes, cfg.stage_timeout)
    run = SegmentRun(centroids=initial_directions(k, dim, cfg.seed))
    center = None  # the federated mean, once released
    for release in range(1, releases + 1):
        t0 = time.perf_counter()
        mean_round = release == 1
        sent = np.zeros((1, dim)) if mean_round else run.centroids
        stats, contributors, metrics, error = _aggregate(
            grid, cfg, _messages(nodes, cfg, release, "stats", release, releases, sent), sent.shape[0] * (dim + 1))
        counts = None
        if stats is None:
            console.print(f"[yellow]release {release}: {error}; centroids unchanged")
        elif mean_round:
            mean, counts = update_centroids(stats, np.zeros((1, dim)), 1.0)
            spread = math.sqrt(max(0.0, 1.0 - float(mean[0] @ mean[0])))  # rows have norm <= 1
            center = mean[0]
            run.centroids = centered_init(center, k, cfg.seed, spread)
        else:
            z = zs[release - 1]
            run.centroids, counts = update_centroids(stats, run.centroids, min_count(z, contributors), center,
                                                     contributors * (z * SENSITIVITY) ** 2)
        for m in metrics:
            entry = run.clients.setdefault(str(int(m.get("node-id", -1))), {"releases": 0})
            if not m.get("declined", 0):
                entry["releases"] += 1
            if "epsilon" in m:
                entry["epsilon"], entry["delta"] = float(m["epsilon"]), float(m.get("delta", cfg.delta))
            if m.get("declined", 0):
                entry["declined_code"] = int(m.get("declined-code", 0))
        eps = [float(m["epsilon"]) for m in metrics if "epsilon" in m and math.isfinite(float(m["epsilon"]))]
        row = {"release": release, "stage": "mean" if mean_round else "lloyd", "contributors": contributors,
               "epsilon_max": max(eps) if eps else None, "seconds": round(time.perf_counter() - t0, 2),
               "noisy_counts": None if counts is None else [round(float(c), 1) for c in counts]}
        run.rounds.append(row)
        console.print(f"release {release}/{releases} ({row['stage']}): {contributors} owners"
                      + (f", epsilon max {row['epsilon_max']:.3f}" if row["epsilon_max"] is not None else ""))
    replies = grid.send_and_receive(_messages(nodes, cfg, releases + 1, "assign", releases, releases, run.centroids),
                                    timeout=cfg.stage_timeout)
    run.owners_written = sum(1 for r in replies if not r.has_error() and not r.content["metrics"].get("declined", 0))
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "centroids.npy", run.centroids)
    (out / "rounds.json").write_text(json.dumps(run.rounds, indent=1))
    return run
