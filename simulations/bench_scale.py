"""Scale: does a simulation train at the speed of its training loop, and does memory stay flat
as the number of virtual clients grows (issue 13)?

    python -m simulations.bench_scale [--clients 10 1000 10000] [--per-round 10] [--rounds 3]
                                      [--default] [key=value ...]

One invocation measures, on this machine and in this order:

- `bare`: the training loop alone, on one core in a fresh process: `train_local` (DP-SGD
  through Opacus, the same model, adapter, length and expected batch as the clients) on
  enough rows that its one-off set-up is amortised; examples per second. This is the
  baseline every ratio uses. It is measured right before and right after each simulation
  (one measurement serves as the next run's "before"), and each run's ratios use the mean
  of its two: a shared machine's speed drifts by tens of percent within an invocation (a
  bare loop measured once at the start, on a slow minute, read 1.25x for the default run).
- `default` (with --default): the default 6-owner synthetic simulation.
- `clients=N`: N virtual clients of `--examples` rows each (synthetic, iid), `--per-round`
  of them sampled each round (at least 1%), DP and secure aggregation on.

For each simulation: examples trained per second (the examples the sampled clients' ledgers
recorded, per round) three ways: over the training phase of the rounds after the first
(sampling, local DP-SGD, secure aggregation: `train_seconds` in metrics.csv), over those
whole rounds (with the server's evaluation and checkpoint: what each further round of a
longer run costs, the headline `efficiency`), and over the whole run, first round included,
whose workers also start and load the model (`run_efficiency`; that one-off, per worker and
not per client, is `startup_s`: the first round's time beyond a typical later round's, 0
when that first round is a probe round cheap enough to hide it);
efficiency = rate / (bare rate x workers) on the CPU, rate / (bare rate x GPUs) on a GPU
(`device=cuda`: the bare loop then runs on the GPU too); the peak resident memory of the
whole process tree (driver and Ray workers), also as a ratio to the smallest N's peak, and
the peak memory in use on the GPU.
Each `--models` entry gets its own bare loop. Results go to `--output`/scale.json and a
plot of the curves to scale.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import threading
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from shared.config import FedConfig
from simulations.bench_accuracy import _config
from shared.quiet import offline_and_quiet


@functools.lru_cache(maxsize=1)
def _first_gpu():
    """NVML's handle of the first GPU, opened once; None without NVML or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no NVML library or no GPU: the CPU runs report no GPU memory
        return None


def gpu_used_bytes() -> int | None:
    """Memory in use on the first GPU, by every process on it (Ray's workers hold their own
    CUDA contexts, which no allocator statistic in this process sees); None without a GPU."""
    gpu = _first_gpu()
    if gpu is None:
        return None
    nvml, handle = gpu
    try:
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
    except nvml.NVMLError:
        return None


class TreePeak(threading.Thread):
    """Peak memory of this process and all its descendants (Ray's workers among them): summed
    RSS, which counts every shared page (the model's file mapping, Ray's object store) once
    per process that touches it, and summed PSS, which splits each shared page among its
    sharers and so adds up to what the tree really holds (read less often: smaps is slower);
    and the peak memory in use on the GPU when there is one."""

    def __init__(self, every: float = 0.5, pss_every: int = 4) -> None:
        super().__init__(daemon=True)
        self.every, self.pss_every, self.stopped = every, pss_every, False
        self.peak, self.pss_peak, self.gpu_peak = 0, 0, gpu_used_bytes()

    def run(self) -> None:
        me = psutil.Process()
        tick = 0
        while not self.stopped:
            rss = pss = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss += proc.memory_info().rss
                    if tick % self.pss_every == 0:
                        pss += proc.memory_full_info().pss
                except (psutil.Error, AttributeError):  # gone, or no PSS on this platform
                    pass
            self.peak, self.pss_peak = max(self.peak, rss), max(self.pss_peak, pss)
            gpu = gpu_used_bytes()
            if gpu is not None:
                self.gpu_peak = max(self.gpu_peak or 0, gpu)
            tick += 1
            time.sleep(self.every)


def _on_gpu(cfg: FedConfig) -> bool:
    from shared.lora import resolve_device

    return resolve_device(cfg.device).type == "cuda"


def capacity(cfg: FedConfig, bare: float) -> float:
    """What the machine could train at the bare loop's rate: the bare loop once per worker on
    the CPU (each worker has its cores), once per GPU on a GPU (the workers share it)."""
    import torch

    if _on_gpu(cfg):
        return bare * torch.cuda.device_count()
    from simulations.run import worker_slots

    return bare * worker_slots(cfg)


def bare_rate(cfg: FedConfig, client_rows: int, rows: int = 1200, batch: int | None = None) -> float:
    """Examples per second of `train_local` on one core (one process on a GPU) at the batch a
    `client_rows` owner uses (or at `batch`), in a fresh process started as Ray starts a worker
    (OMP_NUM_THREADS = its CPUs). In this process, whose libraries started their thread pools
    for every core, the same loop on one thread ran 20-30% slower than the workers' training
    and drifted from call to call (41-51 examples/s against 64-66 in a fresh process), so the
    default run read 1.2x the "bare" loop."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from simulations.run import worker_cpus

    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(worker_cpus(cfg))))  # the child inherits it at spawn
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_bare_rate_alone, cfg, client_rows, rows, batch).result()
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


def _bare_rate_alone(cfg: FedConfig, client_rows: int, rows: int, batch: int | None) -> float:
    import torch

    offline_and_quiet()
    torch.set_num_threads(1)  # one worker's share
    return _bare_rate(cfg, client_rows, rows, batch)


def _bare_rate(cfg: FedConfig, client_rows: int, rows: int, batch: int | None) -> float:
    from client.privacy import PrivacyLedger, plan_privacy
    from client.trainer import probe_rounds, train_local
    from shared.data import choose_max_length, client_partition, encode, load_federation
    from shared.lora import cached_model
    from torch.utils.data import TensorDataset

    fed = load_federation(cfg)
    model, tokenizer = cached_model(cfg, len(fed.labels))
    train = fed.train  # generated on each access, not kept
    frame = train.sample(n=min(rows, len(train)), random_state=0)
    length = choose_max_length(client_partition(cfg, 0), tokenizer, cfg, model)
    dataset = encode(frame, fed.labels, tokenizer, length, task=cfg.task, model=model)
    batch = batch or plan_privacy(cfg, client_rows).batch_size
    plan = dataclasses.replace(plan_privacy(cfg, len(dataset)), batch_size=batch)
    ledger = PrivacyLedger(cfg.delta, float("inf"))
    fine_tune = probe_rounds(cfg) + 1  # the rounds that make up most of a run
    warm = TensorDataset(*(t[: max(1, len(dataset) // 5)] for t in dataset.tensors))
    train_local(model, warm, cfg, ledger, plan, server_round=fine_tune)  # warm: caches, allocator
    start = time.perf_counter()
    train_local(model, dataset, cfg, ledger, plan, server_round=fine_tune)
    return cfg.local_epochs * len(dataset) / (time.perf_counter() - start)


def trained_examples(output: Path, cfg: FedConfig) -> dict[int, float]:
    """Per round, the examples the clients' DP-SGD steps processed, in expectation: steps x
    sampling rate x rows, over every client that trained that round (each ledger keeps its
    own `round_steps` beside its `rounds_trained`; a client's sampling rate depends on its
    size alone, and Opacus merges the repeated rounds into one history entry)."""
    from shared.data import partitioning

    sizes = partitioning(cfg).sizes
    per_round: dict[int, float] = {}
    for path in (output / "ledgers").glob("partition-*.json"):
        pid = int(path.stem.split("-")[1])
        ledger = json.loads(path.read_text())
        rate = ledger["history"][-1][1]
        for server_round, steps in zip(ledger["rounds_trained"], ledger["round_steps"]):
            per_round[server_round] = per_round.get(server_round, 0.0) + steps * rate * sizes[pid]
    return per_round


class BareLoop:
    """The bare loop at one batch, measured on demand; the last measurement is kept so that it
    serves as the next simulation's "before"."""

    def __init__(self, cfg: FedConfig, client_rows: int, rows: int) -> None:
        self.cfg, self.client_rows, self.rows, self.last = cfg, client_rows, rows, None
        self.measured: list[float] = []

    def measure(self) -> float:
        self.last = bare_rate(self.cfg, self.client_rows, self.rows)
        self.measured.append(round(self.last, 2))
        return self.last

    def before(self) -> float:
        return self.last if self.last is not None else self.measure()


def run_simulation(name: str, cfg: FedConfig, bare_loop: BareLoop, console: Console) -> dict:
    import csv

    from simulations.run import simulate

    bare_before = bare_loop.before()
    peak = TreePeak()
    gpu_before = peak.gpu_peak
    peak.start()
    start = time.perf_counter()
    simulate(cfg, console=Console(quiet=True))
    wall = time.perf_counter() - start
    peak.stopped = True
    peak.join()
    bare_after = bare_loop.measure()
    bare = (bare_before + bare_after) / 2
    output = Path(cfg.output)
    with open(output / "metrics.csv") as fh:
        rounds = list(csv.DictReader(fh))
    per_round = trained_examples(output, cfg)
    examples = sum(per_round.values())
    seconds = sum(float(r["seconds"]) for r in rounds)
    # Rounds after the first are what every further round of a longer run costs; the first
    # also starts the workers (imports, model load), a one-off paid once per worker, not per
    # client, and reported apart as `startup_s`.
    later = [r for r in rounds if int(r["round"]) > 1] or rounds
    later_examples = sum(per_round.get(int(r["round"]), 0.0) for r in later)
    steady = later_examples / sum(float(r["train_seconds"]) for r in later)  # training phase alone
    per_round_rate = later_examples / sum(float(r["seconds"]) for r in later)  # whole rounds
    typical = sorted(float(r["seconds"]) for r in later)[len(later) // 2]
    can = capacity(cfg, bare)
    row = {"run": name, "model": cfg.model, "clients": cfg.num_clients, "bare_before": round(bare_before, 1),
           "bare_after": round(bare_after, 1),
           "per_round": max(1, int(cfg.num_clients * cfg.fraction)), "rounds": len(rounds), "examples": round(examples),
           "round_seconds": [float(r["seconds"]) for r in rounds], "train_seconds": [float(r["train_seconds"]) for r in rounds],
           "wall": round(wall, 1), "startup_s": round(max(0.0, float(rounds[0]["seconds"]) - typical), 1),
           "examples_per_s": round(per_round_rate, 1), "train_examples_per_s": round(steady, 1),
           "run_examples_per_s": round(examples / seconds, 1),
           "efficiency": round(per_round_rate / can, 3), "train_efficiency": round(steady / can, 3),
           "run_efficiency": round(examples / seconds / can, 3),
           "peak_rss_mb": round(peak.peak / 2**20), "peak_pss_mb": round(peak.pss_peak / 2**20),
           "peak_gpu_mb": None if peak.gpu_peak is None else round(peak.gpu_peak / 2**20),
           "gpu_before_mb": None if gpu_before is None else round(gpu_before / 2**20), "accuracy": float(rounds[-1].get("accuracy") or "nan")}
    console.print(row)
    return row


def plot(results: dict, path: Path) -> None:
    """Examples per second and efficiency against the number of clients, one curve per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, eff_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for model in sorted({r["model"] for r in results["runs"]}):
        runs = sorted((r for r in results["runs"] if r["model"] == model and r["run"] != "default"), key=lambda r: r["clients"])
        n = [r["clients"] for r in runs]
        rate_ax.plot(n, [r["train_examples_per_s"] for r in runs], "o-", label=f"{model}: training phase")
        rate_ax.plot(n, [r["examples_per_s"] for r in runs], "o--", label=f"{model}: whole rounds")
        eff_ax.plot(n, [r["train_efficiency"] for r in runs], "o-", label=f"{model}: training phase")
        eff_ax.plot(n, [r["efficiency"] for r in runs], "o--", label=f"{model}: whole rounds")
        eff_ax.plot(n, [r["run_efficiency"] for r in runs], "o:", label=f"{model}: whole run (with start-up)")
    for ax, label in ((rate_ax, "examples / s"), (eff_ax, "efficiency (x bare loop)")):
        ax.set_xscale("log")
        ax.set_xlabel("virtual clients")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    eff_ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[10, 1000, 10000])
    parser.add_argument("--models", nargs="*", default=["minilm"], help="e.g. minilm smollm2-135m")
    parser.add_argument("--examples", type=int, default=50, help="rows per virtual client")
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled per round (at least 1%%)")
    parser.add_argument("--one-percent", action=argparse.BooleanOptionalAction, default=True,
                        help="sample at least 1%% of the clients a round (--no-one-percent: exactly --per-round, "
                             "to see memory against the number of clients alone)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bare-rows", type=int, default=1200, help="rows the bare loop trains on (fewer for a large model on CPU)")
    parser.add_argument("--default", action="store_true", help="also the default 6-owner simulation")
    parser.add_argument("--output", default="runs/bench-scale")
    parser.add_argument("overrides", nargs="*", help="FedConfig key=value for every run")
    args = parser.parse_args()
    offline_and_quiet()
    console = Console()
    out = Path(args.output)
    results: dict = {"load_before": os.getloadavg(), "bare": {}, "runs": []}

    for model in args.models:
        base = _config([f"rounds={args.rounds}", f"model={model}", *args.overrides])  # an override wins
        default_cfg = base.replace(output=str(out / model / "default"))
        where = "one process on the GPU" if _on_gpu(default_cfg) else "one core"
        small = BareLoop(default_cfg, args.examples, args.bare_rows)
        results["bare"][model] = {"small": small.measured}
        if args.default:
            default = BareLoop(default_cfg, default_cfg.examples_per_brand, args.bare_rows)
            results["bare"][model]["default"] = default.measured
            results["runs"].append(run_simulation("default", default_cfg, default, console))
            console.print(f"{model}: bare loop, {where}, default owners' batch: {default.measured} examples/s")
        for n in args.clients:
            per_round = max(args.per_round, math.ceil(n / 100)) if args.one_percent else min(args.per_round, n)
            rows = n * args.examples
            cfg = base.replace(num_clients=n, partition_by="", partition="iid", fraction=per_round / n, brands=6,
                               examples_per_brand=math.ceil(rows / 6), output=str(out / model / f"clients-{n}"))
            results["runs"].append(run_simulation(f"clients={n}", cfg, small, console))
        console.print(f"{model}: bare loop, {where}, a {args.examples}-row owner's batch: {small.measured} examples/s")
    table = Table(title=f"scale vs this run's bare loop (load {results['load_before'][0]:.1f})")
    for column in ("model", "run", "per round", "ex/s train", "eff. train", "ex/s rounds", "eff. rounds",
                   "eff. run", "start-up s", "RSS MB", "x first", "PSS MB", "x first", "GPU MB", "accuracy"):
        table.add_column(column, justify="right")
    for r in results["runs"]:
        first = next((f for f in results["runs"] if f["model"] == r["model"] and f["run"].startswith("clients=")), None)
        vs_first = first is not None and r["run"] != "default"
        rss = r["peak_rss_mb"] / first["peak_rss_mb"] if vs_first else float("nan")
        pss = r["peak_pss_mb"] / first["peak_pss_mb"] if vs_first and first["peak_pss_mb"] else float("nan")
        table.add_row(r["model"], r["run"], str(r["per_round"]), f"{r['train_examples_per_s']:.1f}",
                      f"{r['train_efficiency']:.2f}", f"{r['examples_per_s']:.1f}", f"{r['efficiency']:.2f}",
                      f"{r['run_efficiency']:.2f}", f"{r['startup_s']:.1f}",
                      str(r["peak_rss_mb"]), f"{rss:.2f}", str(r["peak_pss_mb"]), f"{pss:.2f}",
                      str(r.get("peak_gpu_mb") or "-"), f"{r['accuracy']:.3f}")
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "scale.png")


if __name__ == "__main__":
    main()
