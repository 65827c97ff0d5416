"""Federated DP k-means on the airline tweets (one owner per airline) against pooled k-means.

`python -m simulations.bench_segment [--k 8] [--epsilon 2] [--repeats 1]` runs `fedlora segment`
on the real-data benchmark's airline training tweets and prints, per run, the objective of the
federated centroids over the objective of scikit-learn k-means on the pooled rows (10
restarts, fitted once in this invocation), the adjusted Rand index between the two, each
owner's epsilon and the wall time; also a non-private federated run (`--no-dp`) as the
reference for what the noise costs. Each simulation runs in its own process (Ray starts once
per process); the owners' embeddings are cached after the first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from shared.config import FedConfig
from simulations.real_data import DATASETS


def _one_run(cfg_json: str) -> None:
    from simulations.segment import simulate_segment

    simulate_segment(FedConfig(**json.loads(cfg_json)), scored=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--epsilon", type=float, default=FedConfig.segment_epsilon)
    parser.add_argument("--rounds", type=int, default=FedConfig.segment_rounds)
    parser.add_argument("--repeats", type=int, default=1, help="private runs (fresh noise each)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-private federated run")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--output", default="runs/bench-segment")
    parser.add_argument("--one-run", help=argparse.SUPPRESS)  # internal: one simulation, in a fresh process
    args = parser.parse_args(argv)
    if args.one_run:
        _one_run(args.one_run)
        return {}
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from shared.segment import assign, objective
    from simulations.segment import pooled_embeddings

    data = DATASETS["airlines"]()
    console = Console()
    base = FedConfig(data=str(data.train), text_column=data.text_column, partition_by=data.owner_column,
                     model=args.model, segment_k=args.k, segment_epsilon=args.epsilon, segment_rounds=args.rounds)
    t0 = time.perf_counter()
    x, _ = pooled_embeddings(base)  # fills the owners' embedding cache the runs read
    pooled = KMeans(n_clusters=args.k, n_init=10, random_state=base.seed).fit(x)
    pooled_obj = objective(x, pooled.cluster_centers_)
    console.print(f"pooled k-means (scikit-learn, 10 restarts) on {len(x)} rows: objective {pooled_obj:.1f}, "
                  f"{time.perf_counter() - t0:.0f} s with the embeddings")
    runs = [(f"dp-{i}", base.replace(output=f"{args.output}/dp-{i}")) for i in range(args.repeats)]
    if not args.no_baseline:
        runs.append(("no-dp", base.replace(dp=False, output=f"{args.output}/no-dp")))
    results = []
    for name, cfg in runs:
        shutil.rmtree(cfg.output, ignore_errors=True)  # fresh ledgers: a rerun must not compose with the last
        t1 = time.perf_counter()
        cfg_json = json.dumps({f: getattr(cfg, f) for f in cfg.__dataclass_fields__})
        done = subprocess.run([sys.executable, "-m", "simulations.bench_segment", "--one-run", cfg_json])
        if done.returncode != 0:
            console.print(f"[red]{name}: the simulation failed (exit {done.returncode})")
            continue
        seconds = time.perf_counter() - t1
        summary = json.loads((Path(cfg.output) / "summary.json").read_text())
        centroids = np.load(Path(cfg.output) / "centroids.npy")
        fed_obj = objective(x, centroids)
        eps = sorted(v["epsilon"] for v in summary["clients"].values() if "epsilon" in v) if cfg.dp else None
        results.append({"run": name, "objective": fed_obj, "pooled_objective": pooled_obj,
                        "objective_ratio": fed_obj / pooled_obj,
                        "ari": float(adjusted_rand_score(pooled.labels_, assign(x, centroids))),
                        "epsilon_per_owner": eps, "seconds": round(seconds, 1)})
    table = Table(title=f"airline tweets, 6 owners, k = {args.k}, epsilon {args.epsilon:g} per owner")
    for col in ("run", "objective / pooled", "ARI vs pooled", "epsilon max", "seconds"):
        table.add_column(col)
    for r in results:
        eps = f"{max(r['epsilon_per_owner']):.3f}" if r["epsilon_per_owner"] else "off"
        table.add_row(r["run"], f"{r['objective_ratio']:.4f}", f"{r['ari']:.3f}", eps, f"{r['seconds']:.0f}")
    console.print(table)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "bench.json").write_text(json.dumps(results, indent=1))
    return {"results": results}


if __name__ == "__main__":
    main()
