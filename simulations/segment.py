"""`fedlora segment`: federated k-means over simulated owners with Flower's simulation engine.

The owners are the same ClientApp as `fedlora simulate` (client/client_app.py routes segment
rounds to client/segment.py); the server loop is server/segment.py. Because a simulation
holds every owner's rows, it also scores the result against k-means on the pooled data
(scikit-learn, not private): the objective of the federated centroids on all rows over the
pooled one, and the adjusted Rand index of the two assignments.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from shared.config import FedConfig
from shared.errors import FedLoraError
from simulations.run import for_simulation, run_flower, with_worker_cpus


def preflight(cfg: FedConfig, console: Console) -> tuple[tuple[str, ...], int]:
    """Bad input as one line before Ray starts: columns, k against every owner's rows, budgets."""
    from client.segment import encoder_dim
    from shared.segment import noise_schedule, simulation_owners

    names, frames, notes = simulation_owners(cfg)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    small = [(n, len(f)) for n, f in zip(names, frames) if len(f) < cfg.segment_k]
    if small:
        raise FedLoraError(f"--k {cfg.segment_k} is larger than owner {small[0][0]}'s {small[0][1]} rows")
    if cfg.dp:
        tiny = [(n, len(f)) for n, f in zip(names, frames) if not cfg.delta < 1.0 / len(f)]
        if tiny:
            raise FedLoraError(f"--delta {cfg.delta} must be below 1/N for owner {tiny[0][0]} with N={tiny[0][1]} rows")
        zs = noise_schedule(cfg.segment_epsilon, cfg.delta, cfg.segment_rounds + 1)
        console.print(f"noise multipliers per release (sensitivity-scaled Gaussian, epsilon {cfg.segment_epsilon:g}): "
                      + ", ".join(f"{z:.2f}" for z in zs))
    if cfg.secure_agg and len(names) < 2:
        raise FedLoraError("secure aggregation needs at least 2 owners (or --no-secure-agg)")
    console.print(f"{len(names)} owners, {min(map(len, frames))} to {max(map(len, frames))} rows, k = {cfg.segment_k}")
    # One machine holds every owner here: embed once, into the owners' cache, with all cores, so
    # no secure-aggregation stage waits on an encoder (and the scoring below reads the same cache).
    t0 = time.perf_counter()
    pooled_embeddings(cfg)
    console.print(f"embedded {sum(map(len, frames))} rows in {time.perf_counter() - t0:.0f} s")
    return names, encoder_dim(cfg)


def pooled_embeddings(cfg: FedConfig) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every owner's embeddings (the owners' own cache makes this a read after the run)."""
    from client.segment import embeddings
    from shared.segment import simulation_owners

    _, frames, _ = simulation_owners(cfg)
    parts = [embeddings(cfg, f[cfg.text_column].astype(str).tolist()) for f in frames]
    return np.concatenate(parts), parts


def score(cfg: FedConfig, centroids: np.ndarray) -> dict:
    """The federated centroids against scikit-learn k-means on the pooled rows (10 restarts)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from shared.segment import assign, objective

    x, _ = pooled_embeddings(cfg)
    pooled = KMeans(n_clusters=cfg.segment_k, n_init=10, random_state=cfg.seed).fit(x)
    centers, labels = pooled.cluster_centers_, pooled.labels_
    fed_obj, pooled_obj = objective(x, centroids), objective(x, centers)
    return {"objective": fed_obj, "pooled_objective": pooled_obj, "objective_ratio": fed_obj / pooled_obj,
            "ari": float(adjusted_rand_score(labels, assign(x, centroids))), "rows": int(len(x))}


def simulate_segment(cfg: FedConfig, console: Console | None = None, verbose: bool = False,
                     scored: bool = True) -> dict:
    """Run the federated k-means and write `summary.json`, `centroids.npy`, the ledgers and
    `owners/<name>/segments.{csv,md,json}` under `cfg.output`. `scored=False` leaves out the
    pooled k-means (`final` is None), for callers that score several runs against one fit."""
    from server.segment import run_segment

    console = console or Console()
    cfg = for_simulation(cfg)
    t0 = time.perf_counter()
    names, dim = preflight(cfg, console)
    cfg = with_worker_cpus(cfg, len(names))
    run = run_flower(cfg, len(names), lambda grid: run_segment(grid, cfg, len(names), dim, console), verbose)
    summary = {"config": cfg.to_run_config(), "owners": list(names), "rounds": run.rounds, "clients": run.clients,
               "owners_written": run.owners_written, "final": score(cfg, run.centroids) if scored else None,
               "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(cfg.output)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    f = summary["final"]
    if f is None:
        return summary
    console.print(f"objective {f['objective']:.1f} vs pooled k-means {f['pooled_objective']:.1f} "
                  f"(ratio {f['objective_ratio']:.3f}), adjusted Rand index {f['ari']:.3f}; "
                  f"segments of {run.owners_written} owners under {out / 'owners'}")
    return summary
