"""Host memory of one owner's local training, as a simulation worker holds it (issue 13).

    python -m simulations.bench_memory [--rows 3000] [--rounds 3] [--variants baseline trim arena]

Each variant runs in a fresh process, one after another: `train_local` with DP on the
largest airline owner (or synthetic rows when the airline data is not cached), MiniLM with
every layer adapted, expected batch 128, 64 tokens. It prints the resident set size (RSS)
after loading, the peak during each round and the RSS after each round, and every
variant's figures as ratios to the baseline's measured in the same invocation.

Variants: `baseline` (as the worker runs it), `trim` (glibc `malloc_trim(0)` after each
round), `arena` (`MALLOC_ARENA_MAX=2`), `mmap` (`MALLOC_MMAP_THRESHOLD_=65536`: large
tensors always come from mmap and go back to the system when freed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from shared.cache import cache_dir

AIRLINES = cache_dir("datasets", "airlines", "train.csv")
ENV = {"arena": {"MALLOC_ARENA_MAX": "2"}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler(threading.Thread):
    def __init__(self, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.every, self.peak, self.stop = every, 0.0, False

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.every)

    def take(self) -> float:
        peak, self.peak = self.peak, rss_mb()
        return peak


def child(variant: str, rows: int, rounds: int, max_length: int) -> dict:
    import gc

    import pandas as pd
    import torch

    from client.privacy import PrivacyLedger, plan_privacy
    from client.trainer import train_local
    from shared.config import FedConfig
    from shared.data import encode
    from shared.lora import cached_model, load_trainable_state

    torch.set_num_threads(1)  # as a simulation worker (node config num-threads)
    cfg = FedConfig(max_length=max_length, batch_size=128, rounds=8, output="")
    if AIRLINES.exists():
        frame = pd.read_csv(AIRLINES).rename(columns={"sentiment": "label"})
        owner = frame["airline"].value_counts().index[0]
        mine = frame[frame["airline"] == owner]
        frame, source = mine.sample(min(rows, len(mine)), random_state=0), f"airline {owner}"
    else:
        from shared.data import load_federation

        frame, source = load_federation(cfg.replace(examples_per_brand=rows, brands=1)).train, "synthetic"
    labels = sorted(frame["label"].astype(str).unique()) if source == "synthetic" else ["negative", "neutral", "positive"]
    frame = frame.assign(label=frame["label"].astype(str))
    cfg = cfg.replace(labels=json.dumps(labels))
    sampler = PeakSampler()
    sampler.start()
    model, tokenizer = cached_model(cfg, len(labels))
    dataset = encode(frame, labels, tokenizer, max_length, source)
    plan = plan_privacy(cfg, len(dataset))
    ledger = PrivacyLedger(cfg.delta, cfg.target_epsilon)
    libc = None
    if variant == "trim":
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    out = {"variant": variant, "source": source, "rows": len(dataset), "loaded_mb": rss_mb(), "rounds": []}
    sampler.take()
    for server_round in range(1, rounds + 1):
        t0 = time.perf_counter()
        load_trainable_state(model, model.fedlora_initial_state)
        result = train_local(model, dataset, cfg, ledger, plan, server_round)
        gc.collect()
        if libc is not None:
            libc.malloc_trim(0)
        after = rss_mb()
        out["rounds"].append({"round": server_round, "peak_mb": sampler.take(), "after_mb": after, "steps": result.steps,
                              "seconds": time.perf_counter() - t0})
        print(json.dumps(out["rounds"][-1]), file=sys.stderr, flush=True)
    sampler.stop = True
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=["baseline", "trim", "arena"],
                        choices=["baseline", "trim", "arena", "mmap"])
    parser.add_argument("--output", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.rounds, args.max_length)))
        return
    results = []
    for variant in args.variants:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **ENV.get(variant, {})}
        proc = subprocess.run([sys.executable, "-m", "simulations.bench_memory", "--child", variant, "--rows", str(args.rows),
                               "--rounds", str(args.rounds), "--max-length", str(args.max_length)],
                              env=env, stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = results[0]
    print(f"{base['source']}, {base['rows']} rows, {args.max_length} tokens, expected batch 128, DP, {args.rounds} rounds "
          f"(round 1 trains the head only)")
    print(f"{'variant':10} {'loaded MB':>10} " + " ".join(f"{'peak r' + str(r['round']):>9} {'after r' + str(r['round']):>9}"
                                                         for r in base["rounds"]) + "  ratio to baseline (peak, after) last round")
    for res in results:
        cells = " ".join(f"{r['peak_mb']:9.0f} {r['after_mb']:9.0f}" for r in res["rounds"])
        last, ref = res["rounds"][-1], base["rounds"][-1]
        print(f"{res['variant']:10} {res['loaded_mb']:10.0f} {cells}  {last['peak_mb'] / ref['peak_mb']:.2f}, "
              f"{last['after_mb'] / ref['after_mb']:.2f}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
