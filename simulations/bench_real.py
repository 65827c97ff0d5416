"""Benchmark on public real data: does a federation beat each owner alone, and how close
does it come to pooling the data?

For each data set (simulations/real_data.py: airline tweets, complaint narratives) it
runs, back to back in one invocation and through the real simulation (Flower's engine):

- `probe`: a logistic regression on the frozen, normalised sentence embeddings of the
  pooled training data (non-private; the bar a fine-tuned model should clear);
- `central`: one client holding all the data, LoRA without DP;
- `central-dp`: one client holding all the data, LoRA with DP at the same budget;
- `federated`: the product's default (one owner per group, DP, secure aggregation),
  with every owner's local-only model at the same budget (`--local-baseline`).

It prints one table (accuracy, macro-F1, points against `central`, wall time and its
ratio to `central`), a per-owner table, and the issue's comparisons; writes
`bench.json` and `bench.png` in `--output`.

    python -m simulations.bench_real [--datasets airlines complaints] [--max-train-rows N] [key=value ...]

`key=value` pairs override FedConfig defaults for every run (none are needed). On a
2-core machine the complaint narratives are long: `--max-train-rows` and
`--max-test-rows` subsample them (stratified by owner) to fit a time budget.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from server.report import epsilon_max
from shared.config import FedConfig
from shared.data import choose_max_length, encode, load_federation
from shared.evaluation import scores
from shared.lora import cached_model
from shared.quiet import offline_and_quiet
from simulations.bench_accuracy import _config
from simulations.real_data import DATASETS, RealData
from simulations.run import simulate

VARIANTS = {
    "central": {"dp": False, "secure_agg": False, "num_clients": 1, "partition_by": ""},
    "central-dp": {"secure_agg": False, "num_clients": 1, "partition_by": ""},
    "federated": {"local_baseline": True},
}


def subsample(data: RealData, max_train: int, max_test: int) -> RealData:
    """A smaller copy of the data set, the same owners in the same proportions."""
    if not max_train and not max_test:
        return data
    out = {}
    for split, path, cap in (("train", data.train, max_train), ("test", data.test, max_test)):
        df = pd.read_csv(path)
        if cap and len(df) > cap:
            df = df.sample(n=cap, random_state=0).sort_index()
        target = path.with_name(f"{path.stem}-{cap or 'all'}.csv")
        df.to_csv(target, index=False)
        out[split] = target
    return RealData(data.name, out["train"], out["test"], data.text_column, data.label_column, data.owner_column)


def linear_probe(cfg: FedConfig) -> dict:
    """Logistic regression on the base model's frozen sentence embeddings (no DP)."""
    from sklearn.linear_model import LogisticRegression

    x_train, y_train, x_test, y_test, num_labels = probe_features(cfg)
    clf = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    return scores(clf.predict(x_test), y_test, num_labels)


@torch.no_grad()
def probe_features(cfg: FedConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The base model's sentence embeddings (its task head's inputs) and the labels of the
    train and test rows."""
    from client.feature_center import head_layer
    from shared.frozen_prefix import head_inputs

    fed = load_federation(cfg)
    model, tokenizer = cached_model(cfg, len(fed.labels))
    head = head_layer(model)

    def embed(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        data = encode(frame, fed.labels, tokenizer, choose_max_length(frame, tokenizer, cfg, model))
        return head_inputs(model, head, data).numpy(), data.tensors[-1].numpy()

    # the process's cached model may hold adapters a run before this one trained (the
    # server's evaluation, the local-only baselines): the probe reads the base model alone
    with model.disable_adapter():
        x_train, y_train = embed(fed.train)
        x_test, y_test = embed(fed.test)
    return x_train, y_train, x_test, y_test, len(fed.labels)


def run_dataset(data: RealData, base: FedConfig, variants: list[str], output: Path, console: Console) -> dict:
    cfg = base.replace(data=str(data.train), test_data=str(data.test), text_column=data.text_column,
                       label_column=data.label_column, partition_by=data.owner_column)
    results: dict[str, dict] = {}
    for name in variants:
        console.rule(f"{data.name}: {name}")
        start = time.perf_counter()
        if name == "probe":
            final, owners, eps = linear_probe(cfg), {}, None
        else:
            summary = simulate(cfg.replace(**VARIANTS[name], output=str(output / data.name / name)), console)
            final, owners, eps = summary["final"], summary.get("owners", {}), epsilon_max(summary)
        results[name] = {"accuracy": final["accuracy"], "macro_f1": final["macro_f1"],
                         "seconds": time.perf_counter() - start, "epsilon_max": eps, "owners": owners}
    return results


def comparisons(results: dict) -> list[str]:
    """The issue's criteria, as measured in this run."""
    lines = []
    f1 = {k: v["macro_f1"] for k, v in results.items()}
    if "federated" in f1 and "central" in f1:
        lines.append(f"federated macro-F1 is {100 * (f1['central'] - f1['federated']):.1f} points below central (target: <= 5)")
    if "central" in f1 and "probe" in f1:
        lines.append(f"central - probe: {100 * (f1['central'] - f1['probe']):+.1f} points (target: >= 0)")
    owners = results.get("federated", {}).get("owners", {})
    pairs = [(e["rows"], e["local"]["macro_f1"], e["federated"]["macro_f1"]) for e in owners.values()
             if e.get("local") and e.get("federated")]
    if pairs:
        gain = np.mean([fed - local for _, local, fed in pairs])
        rows, local, fed = min(pairs)
        lines.append(f"federated - local-only, mean over owners: {100 * gain:+.1f} points (target: >= 3)")
        lines.append(f"federated - local-only, smallest owner ({rows} rows): {100 * (fed - local):+.1f} points")
    if "federated" in f1 and "probe" in f1:
        lines.append(f"federated - probe: {100 * (f1['federated'] - f1['probe']):+.1f} points")
    return lines


def plot(all_results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 * len(all_results), figsize=(6 * len(all_results), 3.8), squeeze=False)
    for i, (dataset, results) in enumerate(all_results.items()):
        ax = axes[0][2 * i]
        names = list(results)
        ax.bar(names, [results[n]["macro_f1"] for n in names], color="tab:green")
        ax.set_title(f"{dataset}: macro-F1 by variant")
        ax.set_ylim(0, 1)
        ax = axes[0][2 * i + 1]
        owners = results.get("federated", {}).get("owners", {})
        names = [n for n, e in owners.items() if e.get("local") and e.get("federated")]
        x = np.arange(len(names))
        ax.bar(x - 0.2, [owners[n]["local"]["macro_f1"] for n in names], 0.4, label="local-only")
        ax.bar(x + 0.2, [owners[n]["federated"]["macro_f1"] for n in names], 0.4, label="federated")
        ax.set_xticks(x, [n[:10] for n in names], rotation=45, fontsize="small")
        ax.set_title(f"{dataset}: per owner, same epsilon")
        ax.set_ylim(0, 1)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=["probe", "central", "central-dp", "federated"],
                        choices=["probe", *VARIANTS])
    parser.add_argument("--max-train-rows", type=int, default=0, help="subsample each data set's training rows (0: all)")
    parser.add_argument("--max-test-rows", type=int, default=0, help="subsample each data set's test rows (0: all)")
    parser.add_argument("--output", default="runs/bench-real")
    parser.add_argument("overrides", nargs="*", help="FedConfig key=value for every run")
    args = parser.parse_args()
    offline_and_quiet()
    console = Console()
    base = _config(args.overrides)
    output = Path(args.output)
    variants = list(dict.fromkeys(args.variants))  # `central` is the reference: leave it out only to split a run
    all_results = {}
    for name in args.datasets:
        data = subsample(DATASETS[name](), args.max_train_rows, args.max_test_rows)
        all_results[name] = run_dataset(data, base, variants, output, console)

    table = Table(title="real data: one invocation, ratios against `central`")
    for column in ("data", "variant", "acc", "macro-F1", "vs central", "eps", "sec", "time x"):
        table.add_column(column, justify="right")
    for dataset, results in all_results.items():
        ref = results.get("central")
        for name, r in results.items():
            eps = f"{r['epsilon_max']:.2f}" if r["epsilon_max"] is not None else "off"
            versus = (f"{100 * (r['macro_f1'] - ref['macro_f1']):+.1f}", f"{r['seconds'] / ref['seconds']:.2f}") \
                if ref else ("-", "-")
            table.add_row(dataset[:10], name, f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}",
                          versus[0], eps, f"{r['seconds']:.0f}", versus[1])
    console.print(table)
    from simulations.local_only import print_owner_table

    for dataset, results in all_results.items():
        if results.get("federated", {}).get("owners"):
            console.print(f"[bold]{dataset}")
            print_owner_table(results["federated"]["owners"], console)
        for line in comparisons(results):
            console.print(f"{dataset}: {line}")
    output.mkdir(parents=True, exist_ok=True)
    (output / "bench.json").write_text(json.dumps({"config": base.to_run_config(), "results": all_results,
                                                   "comparisons": {d: comparisons(r) for d, r in all_results.items()}},
                                                  indent=2))
    plot(all_results, output / "bench.png")
    console.print(f"wrote {output / 'bench.json'} and {output / 'bench.png'}")


if __name__ == "__main__":
    main()
