"""What the disk store of frozen features saves a worker that did not compute them.

    python -m simulations.bench_feature_store [--dataset complaints] [--owner owner-00]
        [--lora-layers 2] [--max-length-cap 128] [--threads 1]

One owner of a real data set (simulations/real_data.py), `--lora-layers K` and
`--cached-probe`, DP at the defaults: it times one probe round and one adapter round
through `client.trainer.train_local` three times in one process:
- `cold`: an empty disk store and no features in memory (the frozen layers run);
- `disk`: the process's own cache emptied, as a Ray worker that served another owner last
  round, or a restarted agent, finds it; the features come memory-mapped from the store;
- `memory`: the features still open in the process (what the in-process cache alone gave
  when the worker happened to keep them).
It prints each as a ratio of `cold`'s time. The store lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import shared.frozen_prefix as fp
from client.privacy import PrivacyLedger, plan_privacy
from client.trainer import probe_rounds, train_local
from shared.config import FedConfig
from shared.data import choose_max_length, client_partition, encode, load_federation, partitioning, with_labels
from shared.lora import cached_model, load_trainable_state
from shared.quiet import offline_and_quiet
from simulations.real_data import DATASETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="complaints")
    parser.add_argument("--owner", default="", help="default: the data set's smallest owner")
    parser.add_argument("--lora-layers", type=int, default=2)
    parser.add_argument("--max-length-cap", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as one Ray worker of one CPU")
    args = parser.parse_args()
    offline_and_quiet()
    torch.set_num_threads(args.threads)
    real = DATASETS[args.dataset]()
    cfg = FedConfig(data=str(real.train), test_data=str(real.test), text_column=real.text_column,
                    label_column=real.label_column, partition_by=real.owner_column,
                    max_length_cap=args.max_length_cap, lora_layers=args.lora_layers, cached_probe=True)
    fed = load_federation(cfg)
    cfg = with_labels(cfg, fed)
    parts = partitioning(cfg)
    frames = {name: client_partition(cfg, pid) for pid, name in enumerate(parts.names)}
    owner = args.owner or min(frames, key=lambda n: len(frames[n]))
    model, tokenizer = cached_model(cfg, len(fed.labels))
    data = encode(frames[owner], fed.labels, tokenizer, choose_max_length(frames[owner], tokenizer, cfg, model),
                  owner, task=cfg.task, model=model)
    ledger, plan = PrivacyLedger(cfg.delta, cfg.target_epsilon), plan_privacy(cfg, len(data))
    rounds = {"probe": 1, "adapter": probe_rounds(cfg) + 1}
    with tempfile.TemporaryDirectory() as store:
        fp._store = lambda: Path(store)
        times: dict[str, dict[str, float]] = {}
        for state in ("cold", "disk", "memory"):
            if state != "memory":
                fp._CACHE.clear()
            times[state] = {}
            for kind, server_round in rounds.items():
                load_trainable_state(model, model.fedlora_initial_state)  # the same adapters each time:
                start = time.perf_counter()  # moved ones would need fresh pooled features
                train_local(model, data, cfg, ledger, plan, server_round)
                times[state][kind] = time.perf_counter() - start
    print(f"{args.dataset} {owner} ({len(data)} rows), --lora-layers {args.lora_layers}, "
          f"{args.max_length_cap}-token cap, {args.threads} thread(s): seconds per round")
    for state, by_kind in times.items():
        cells = "  ".join(f"{kind} {t:6.2f} s (x{t / times['cold'][kind]:.2f})" for kind, t in by_kind.items())
        print(f"  {state:7s} {cells}")


if __name__ == "__main__":
    main()
