"""Replay the DP linear probe on frozen embeddings: seconds per recipe instead of an hour.

The probe rounds (LP-FT's first rounds, client/trainer.py) train only the task head, so
their course depends on the frozen encoder's features alone. This replays them on a real
data set (simulations/real_data.py) with each owner's own privacy plan (client/privacy.py:
its batch, sampling rate and noise multiplier for the whole run), DP-SGD with momentum at
the head's rate per unit of clipped gradient, the logit-adjusted loss on a noisy label
prior, FedAvg over the owners and the release average; it prints the pooled test
macro-F1 after each round for the baseline recipe and for each variant, with the ratio.
It is a planning tool: the product's run adds the adapters' rounds on top. `--pooled`
replays one owner holding every row (bench_real's `central-dp`), so the cost of the
federation and the cost of the noise can be told apart.

    python -m simulations.replay_probe [--dataset complaints] [--rounds 4] [--max-length-cap 128]
        [--variant center_noise=5,head_lr=8 ...] [--repeats 2] [--pooled]

The features are computed once per data set and length with the product's model and
kept in the local cache (`$FEDLORA_CACHE/replay`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from client.privacy import plan_privacy
from shared.atomic import atomic_write
from shared.cache import cache_dir
from shared.config import FedConfig
from shared.evaluation import scores
from shared.quiet import offline_and_quiet
from simulations.real_data import DATASETS


@torch.no_grad()
def features(cfg: FedConfig, name: str) -> dict:
    """Frozen head inputs of every train and test row, and each train row's owner (cached)."""
    path = cache_dir("replay") / f"{name}-{cfg.max_length_cap}.npz"
    if not path.exists():
        from shared.data import load_federation
        from simulations.bench_real import probe_features

        xtrain, ytrain, xtest, ytest, _ = probe_features(cfg)
        fed = load_federation(cfg)
        out = dict(xtrain=xtrain, ytrain=ytrain, xtest=xtest, ytest=ytest,
                   owner=fed.train[cfg.partition_by].astype(str).to_numpy(), labels=np.array(fed.labels))
        atomic_write(path, lambda fh: np.savez(fh, **out), private=True)  # owners' features
    return dict(np.load(path, allow_pickle=True))


def replay(cfg: FedConfig, data: dict, rounds: int, seed: int, pooled: bool = False) -> list[float]:
    """Macro-F1 of the released head after each probe round (`pooled`: one owner holds every row)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.tensor(data["xtrain"]), torch.tensor(data["ytrain"]).long()
    labels, width = len(data["labels"]), x.shape[1]
    weight, bias = torch.zeros(labels, width), torch.zeros(labels)
    owners = []
    owner_of = np.zeros(len(y), dtype=int) if pooled else data["owner"]
    for name in sorted(set(owner_of)):
        rows = torch.tensor(np.flatnonzero(owner_of == name))
        plan = plan_privacy(cfg, len(rows))
        counts = torch.bincount(y[rows], minlength=labels).float() + cfg.label_prior_noise * torch.randn(labels, generator=g)
        prior = counts.clamp(min=0) + cfg.label_prior_noise
        mu = None
        if plan.center_noise:  # client/feature_center.py: noisy sum over noisy count
            noisy = x[rows].sum(0) + plan.center_noise * math.sqrt(2) * torch.randn(width, generator=g)
            mu = noisy / max(1.0, len(rows) + plan.center_noise * math.sqrt(2) * float(torch.randn(1, generator=g)))
        owners.append((rows, plan, cfg.logit_adjust * torch.log(prior / prior.sum()), mu))
    released, history = None, []
    for _ in range(rounds):
        new_w, new_b = torch.zeros_like(weight), torch.zeros_like(bias)
        for rows, plan, offset, mu in owners:
            w, b = weight.clone(), bias.clone()
            if mu is not None:
                b += w @ mu
            vw, vb = torch.zeros_like(w), torch.zeros_like(b)
            for _ in range(plan.steps_per_round):
                batch = rows[torch.rand(len(rows), generator=g) < plan.sample_rate]
                feats = x[batch] - mu if mu is not None else x[batch]
                err = torch.softmax(feats @ w.T + b + offset, 1)
                err[torch.arange(len(batch)), y[batch]] -= 1
                norms = (err.square().sum(1) * (feats.square().sum(1) + 1)).sqrt()
                scale = (cfg.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)[:, None]
                noise = plan.noise_multiplier * cfg.max_grad_norm
                gw = ((err * scale).T @ feats + noise * torch.randn(labels, width, generator=g)) / plan.batch_size
                gb = ((err * scale).sum(0) + noise * torch.randn(labels, generator=g)) / plan.batch_size
                vw, vb = 0.9 * vw + gw, 0.9 * vb + gb
                w -= cfg.head_lr / cfg.max_grad_norm * vw
                b -= cfg.head_lr / cfg.max_grad_norm * vb
            if mu is not None:
                b -= w @ mu
            new_w += w / len(owners)
            new_b += b / len(owners)
        weight, bias = new_w, new_b
        a = cfg.release_average
        released = (weight, bias) if released is None else (a * released[0] + (1 - a) * weight, a * released[1] + (1 - a) * bias)
        pred = (torch.tensor(data["xtest"]) @ released[0].T + released[1]).argmax(1).numpy()
        history.append(scores(pred, data["ytest"], labels)["macro_f1"])
    return history


def _variant(text: str) -> dict:
    out = {}
    for pair in filter(None, text.split(",")):
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = json.loads(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="complaints")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-length-cap", type=int, default=128)
    parser.add_argument("--variant", action="append", default=[], help="key=value[,key=value]: FedConfig settings")
    parser.add_argument("--repeats", type=int, default=2, help="seeds of the replay's own noise, averaged")
    parser.add_argument("--pooled", action="store_true", help="one owner holds every training row (central DP)")
    parser.add_argument("--output", default="", help="write the figures as JSON here")
    args = parser.parse_args()
    offline_and_quiet()
    torch.set_num_threads(1)
    real = DATASETS[args.dataset]()
    base = FedConfig(data=str(real.train), test_data=str(real.test), text_column=real.text_column,
                     label_column=real.label_column, partition_by=real.owner_column,
                     max_length_cap=args.max_length_cap)
    data = features(base, args.dataset)
    base = base.replace(labels=json.dumps([str(v) for v in data["labels"]]))
    results = {}
    for text in ["", *args.variant]:
        cfg = base.replace(**_variant(text))
        runs = np.array([replay(cfg, data, args.rounds, seed, args.pooled) for seed in range(args.repeats)])
        results[text or "baseline"] = runs.mean(0).tolist()
    first = results["baseline"]
    for name, f1 in results.items():
        rounds = " ".join(f"{v:.3f}" for v in f1)
        print(f"{args.dataset}{' pooled' if args.pooled else ''} {name:32s} macro-F1 by round {rounds}   x{f1[-1] / first[-1]:.3f} of baseline")
    if args.output:
        Path(args.output).write_text(json.dumps({"dataset": args.dataset, "rounds": args.rounds,
                                                 "max_length_cap": args.max_length_cap, "repeats": args.repeats,
                                                 "pooled": args.pooled,
                                                 "macro_f1": results}, indent=1))


if __name__ == "__main__":
    main()
