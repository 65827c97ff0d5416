"""Benchmark: what DP and federation cost in accuracy and time, against baselines run here.

Runs the real simulation (`fedlora simulate`, Flower's engine) for each variant, back to
back on the same machine, and prints accuracy and wall time as ratios to the centralized
non-private baseline (`--no-dp --num-clients 1`), the comparison issue 2 asks for.

    python -m simulations.bench_accuracy [--variants dp-secagg dp-plain central] [--rounds 8] [FedConfig flags...]

Extra `key=value` pairs override the default config for every variant, e.g.
`examples_per_brand=400 batch_size=64` to see how DP fares with less data per owner.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

from rich.console import Console
from rich.table import Table

from server.report import epsilon_max
from shared.config import FedConfig
from simulations.run import simulate

VARIANTS = {
    "central": {"dp": False, "secure_agg": False, "num_clients": 1, "partition_by": ""},
    "fed-no-dp": {"dp": False},
    "dp-plain": {"secure_agg": False},
    "dp-secagg": {},
}


def _config(pairs: list[str]) -> FedConfig:
    """`key=value` pairs parsed the way Flower's run config is (hyphens or underscores);
    a later pair overrides an earlier one for the same setting, however it is spelt; the
    task's own defaults fill what no pair sets, as on the CLI."""
    values = {key.replace("-", "_"): value for key, _, value in (pair.partition("=") for pair in pairs)}
    known = {f.name for f in fields(FedConfig)}
    unknown = [k for k in values if k not in known]
    if unknown:
        raise SystemExit(f"unknown setting {unknown[0]!r}")
    from shared.tasks import with_task_defaults

    return FedConfig.from_run_config(with_task_defaults(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["central", "dp-secagg"], choices=list(VARIANTS))
    parser.add_argument("--output", default="runs/bench-accuracy")
    parser.add_argument("overrides", nargs="*", help="FedConfig key=value for every variant")
    args = parser.parse_args()
    console = Console()
    base = _config(args.overrides)
    results = {}
    for name in ["central", *[v for v in args.variants if v != "central"]]:
        cfg = base.replace(**VARIANTS[name], output=str(Path(args.output) / name))
        console.rule(name)
        start = time.perf_counter()
        summary = simulate(cfg, console)
        results[name] = {"accuracy": summary["final"]["accuracy"], "seconds": time.perf_counter() - start,
                         "epsilon_max": epsilon_max(summary)}
    ref = results["central"]
    table = Table(title="accuracy and wall time against the centralized non-private baseline (same run)")
    for column in ("variant", "accuracy", "acc / central", "points below", "eps max", "seconds", "time / central"):
        table.add_column(column, justify="right")
    for name, r in results.items():
        eps = f"{r['epsilon_max']:.2f}" if r["epsilon_max"] is not None else "off"
        table.add_row(name, f"{r['accuracy']:.3f}", f"{r['accuracy'] / ref['accuracy']:.3f}",
                      f"{100 * (ref['accuracy'] - r['accuracy']):.1f}", eps, f"{r['seconds']:.0f}",
                      f"{r['seconds'] / ref['seconds']:.2f}")
    console.print(table)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
