"""Federated DP k-means on the airline tweets (one owner per airline) against pooled k-means.

`python -m simulations.bench_segment [--k 8] [--epsilon 2] [--repeats 1]` runs `fedlora segment`
on the real-data benchmark's airline training tweets and prints, per run, the objective of the
federated centroids over the objective of scikit-learn k-means on the pooled rows (10
restarts, measured in the same invocation), the adjusted Rand index between the two, each
owner's epsilon and the wall time. Also a non-private federated run (`--no-dp`) as the
reference for what the noise costs. The owners' embeddings are cached after the first run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shared.config import FedConfig
from simulations.real_data import DATASETS


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--epsilon", type=float, default=FedConfig.segment_epsilon)
    parser.add_argument("--rounds", type=int, default=FedConfig.segment_rounds)
    parser.add_argument("--repeats", type=int, default=1, help="private runs (fresh noise each)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-private federated run")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--output", default="runs/bench-segment")
    args = parser.parse_args(argv)
    from simulations.segment import simulate_segment

    data = DATASETS["airlines"]()
    console = Console()
    base = FedConfig(data=str(data.train), text_column=data.text_column, partition_by=data.owner_column,
                     model=args.model, segment_k=args.k, segment_epsilon=args.epsilon, segment_rounds=args.rounds)
    runs = [("dp", i, base.replace(output=f"{args.output}/dp-{i}")) for i in range(args.repeats)]
    if not args.no_baseline:
        runs.append(("no-dp", 0, base.replace(dp=False, output=f"{args.output}/no-dp")))
    results = []
    for kind, i, cfg in runs:
        if Path(cfg.output).exists():  # fresh ledgers: a rerun must not compose with the last one
            import shutil

            shutil.rmtree(cfg.output)
        t0 = time.perf_counter()
        summary = simulate_segment(cfg, console)
        eps = {c: round(v["epsilon"], 4) for c, v in summary["clients"].items() if "epsilon" in v}
        results.append({"run": f"{kind}-{i}", "seconds": round(time.perf_counter() - t0, 1), **summary["final"],
                        "epsilon_per_owner": sorted(eps.values()) if cfg.dp else None})
    table = Table(title=f"airline tweets, {len(summary['owners'])} owners, k = {args.k}, epsilon {args.epsilon:g} per owner")
    for col in ("run", "objective / pooled", "ARI vs pooled", "epsilon max", "seconds"):
        table.add_column(col)
    for r in results:
        eps = max(r["epsilon_per_owner"]) if r["epsilon_per_owner"] else None
        table.add_row(r["run"], f"{r['objective_ratio']:.4f}", f"{r['ari']:.3f}",
                      f"{eps:.3f}" if eps is not None else "off", f"{r['seconds']:.0f}")
    console.print(table)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "bench.json").write_text(json.dumps(results, indent=1))
    return {"results": results}


if __name__ == "__main__":
    main()
