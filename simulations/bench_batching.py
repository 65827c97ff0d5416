"""Would a batched multi-adapter layer beat serving virtual clients one at a time?

A worker that holds k virtual clients could stack their Poisson batches into one forward
and backward pass, each example running through its own client's adapter slice. The
most that can gain is what one pass over the stacked batch gains over k passes over the
small ones with a single adapter: the slice gather and the per-client clipping and noise
only add to it. This measures that bound with the real training step (`train_local`,
DP on, one core as a simulation worker has): examples per second at a client's batch b
and at k * b, alternating the two (ABAB...) so that a busy machine slows both alike.

    python -m simulations.bench_batching [--client-rows 50] [--clients 2 5 10] [--reps 3] [key=value ...]

A ratio near 1 (or below) means stacking cannot pay on this machine and the worker keeps
serving clients one at a time (issue 13: keep it only if it beats one-at-a-time).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shared.quiet import offline_and_quiet
from simulations.bench_accuracy import _config
from simulations.bench_scale import bare_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client-rows", type=int, default=50, help="rows of each virtual client (its DP batch follows)")
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 5, 10], help="clients stacked in one pass")
    parser.add_argument("--reps", type=int, default=3, help="alternating measurements of each size")
    parser.add_argument("--output", default="runs/bench-batching")
    parser.add_argument("overrides", nargs="*", help="FedConfig key=value")
    args = parser.parse_args()
    offline_and_quiet()
    cfg = _config(args.overrides)
    from client.privacy import plan_privacy

    batch = plan_privacy(cfg, args.client_rows).batch_size
    sizes = [1, *args.clients]
    rates: dict[int, list[float]] = {k: [] for k in sizes}
    for _ in range(args.reps):
        for k in sizes:
            rates[k].append(bare_rate(cfg, args.client_rows, batch=k * batch))
    one = statistics.median(rates[1])
    table = Table(title=f"{cfg.model}: one pass over k clients' stacked batches vs one client's batch")
    for col in ("clients stacked", "batch", "examples/s (median)", "ratio to 1"):
        table.add_column(col, justify="right")
    rows = []
    for k in sizes:
        rate = statistics.median(rates[k])
        rows.append({"clients": k, "batch": k * batch, "rates": rates[k], "median": rate, "ratio": rate / one})
        table.add_row(str(k), str(k * batch), f"{rate:.1f}", f"{rate / one:.2f}")
    Console().print(table)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_batching.json").write_text(json.dumps({"model": cfg.model, "client_rows": args.client_rows,
                                                         "results": rows}, indent=2))


if __name__ == "__main__":
    main()
