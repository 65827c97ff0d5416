"""Empirical privacy audit: how much do the final adapter and the per-round aggregates
really tell about one owner's examples? A lower bound on epsilon from one training run.

Method (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1) training run"):
`m` canaries (random-token texts with random labels) are made for one owner; each is
included in that owner's data independently with probability 1/2. The federation trains
once, through the project's one training path (`client/trainer.py::train_local`, with the
owner's real `PrivacyPlan` and `PrivacyLedger`), FedAvg with equal weights (as under DP).
An attacker then scores every canary (centred by label: the attacker knows the labels, and
the model's pull on canaries as a group says nothing about which were in) and guesses
"included" for the k highest and "excluded" for the k lowest scores. Under (eps, delta)-DP the number of correct guesses
among the 2k is dominated by Binomial(2k, e^eps / (1 + e^eps)) up to a delta term
(their Theorem 3 / Algorithm 2), so an observed count that would be too unlikely under
that binomial refutes eps: the largest refuted eps, at 95% confidence, is the bound.
k is taken from a fixed grid with a Bonferroni correction, so the bound stays valid.

Two attackers:
- `final`: the final global adapter only (what anyone given the trained model has):
  score = the canary's loss under the initial adapter minus its loss under the final one.
- `rounds`: every round's aggregate (what the server sees), white-box: in each round, the
  alignment between the canary's unit-length gradient on every trainable tensor (LoRA B
  and the task head) at the round's starting global model and the round's aggregate step,
  label-centred and standardised per round, summed over rounds, plus the `final` score
  standardised the same way (that server holds the final model too).

The default model is the product's (minilm): the random-weight tiny-bert of the tests has
no power at all (DP off, 1000 canaries, 8 rounds: AUC 0.51, bound 0 for every attacker).

    python -m simulations.audit --runs 1 --dp off --dp 1 --dp 8 --output runs/audit.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from client.privacy import PrivacyLedger, plan_privacy
from client.trainer import train_local
from shared.config import FedConfig
from shared.data import SYNTHETIC_LABELS, client_partition, encode, trim_padding
from shared.lora import build_model, load_trainable_state, trainable_state

CONFIDENCE = 0.95
K_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)  # guesses per side, as fractions of m/2


# --- the bound (Steinke, Nasr, Jagielski 2023, Algorithm 2) ---------------------------

def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (eps, delta)-DP with m canaries."""
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(stats.binom.sf(v - 1, r, q))
    alpha, tail = 0.0, 0.0
    for i in range(1, v + 1):  # alpha = max_i P[v > Bin(r, q) >= v - i] / i
        tail += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, tail / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float) -> float:
    """The largest eps with p_value < p (eps is refuted at confidence 1 - p); 0 if none."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, hi * 2
        if hi > 100:
            return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < p else (lo, mid)
    return lo


def audit_scores(scores: np.ndarray, included: np.ndarray, delta: float) -> dict:
    """Bonferroni over the k grid: (eps lower bound, guesses, correct, k)."""
    m = len(scores)
    order = np.argsort(-scores)  # most likely included first
    best = {"epsilon_lb": 0.0, "guesses": 0, "correct": 0, "k": 0}
    p = (1 - CONFIDENCE) / len(K_FRACTIONS)
    for frac in K_FRACTIONS:
        k = max(1, int(frac * m / 2))
        top, bottom = order[:k], order[m - k:]
        v = int(included[top].sum() + (~included[bottom]).sum())
        eps = epsilon_lower_bound(m, 2 * k, v, delta, p)
        if eps > best["epsilon_lb"] or best["k"] == 0:
            best = {"epsilon_lb": eps, "guesses": 2 * k, "correct": v, "k": k}
    auc = _auc(scores, included)
    return best | {"auc": auc}


def center_by_label(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Subtract each label's mean score: the attacker knows every canary's label, and what
    a model learns about canaries *as a group* (word salad -> label) says nothing about
    which ones were in; what is left is each canary's own pull on the model."""
    out = scores.astype(np.float64).copy()
    for label in np.unique(labels):
        out[labels == label] -= out[labels == label].mean()
    return out


def _auc(scores: np.ndarray, included: np.ndarray) -> float:
    ranks = stats.rankdata(scores)
    n1, n0 = int(included.sum()), int((~included).sum())
    return float((ranks[included].sum() - n1 * (n1 + 1) / 2) / max(1, n1 * n0))


# --- canaries and training ---------------------------------------------------------------

def make_canaries(m: int, rng: np.random.Generator, tokenizer, words: int = 10) -> pd.DataFrame:
    """Random sentences of whole vocabulary words with random labels: far from the task's
    data, unlike each other, so a model that trains on one moves that one's loss."""
    vocab = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 3)
    vocab = np.array(vocab)
    texts = [" ".join(rng.choice(vocab, size=words)) for _ in range(m)]
    labels = [SYNTHETIC_LABELS[i] for i in rng.integers(0, len(SYNTHETIC_LABELS), size=m)]
    return pd.DataFrame({"text": texts, "label": labels})


def _losses(model, ds) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(ds), 256):
            ids, mask, y = ds[i:i + 256]
            ids, mask = trim_padding(ids, mask)
            logits = model(input_ids=ids, attention_mask=mask).logits
            out.append(torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy())
    return np.concatenate(out)


def _unit_gradients(model, ds, keys: list[str], batch: int = 128) -> np.ndarray:
    """Each canary's loss gradient on every trainable tensor (LoRA B and the task head), in
    `keys` order, normalised to length 1: per-example gradients from Opacus's hooks, dropout
    off (the attacker's own computation, not a training step)."""
    from opacus import GradSampleModule

    named = dict(model.named_parameters())
    model.eval()  # no dropout (nor attention dropout); but Opacus records activations only
    for module in model.modules():  # of modules in training mode: the ones holding trainable tensors
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.train()
    gsm = GradSampleModule(model)
    out = []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*backward hook.*")
            for i in range(0, len(ds), batch):
                ids, mask, y = ds[i:i + batch]
                ids, mask = trim_padding(ids, mask)
                logits = gsm(input_ids=ids, attention_mask=mask).logits
                torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
                g = torch.cat([named[k].grad_sample.reshape(len(y), -1) for k in keys], dim=1).double().numpy()
                out.append(g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12))
                for p in named.values():
                    p.grad, p.grad_sample = None, None
    finally:
        gsm._close()
        for p in named.values():
            p.grad = None
        model.eval()
    return np.concatenate(out)


def standardise(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Label-centred scores in units of their spread, so rounds (and the final model) whose
    raw scale differs weigh alike when summed."""
    out = center_by_label(scores, labels)
    return out / max(float(out.std()), 1e-12)


def _flat(state: dict, keys: list[str]) -> np.ndarray:
    return np.concatenate([state[k].reshape(-1).astype(np.float64) for k in keys])


def _unflat(flat: np.ndarray, like: dict, keys: list[str]) -> dict:
    pos, out = 0, {}
    for k in keys:
        size = like[k].size
        out[k] = flat[pos:pos + size].reshape(like[k].shape).astype(like[k].dtype)
        pos += size
    return out


@dataclass
class RunResult:
    dp: str
    claimed_epsilon: float | None
    spent_epsilon: float | None
    canaries: int
    included: int
    owner_examples: int
    final: dict
    rounds: dict
    seconds: float
    raw: dict


def run_once(cfg: FedConfig, m: int, seed: int, owners: int) -> RunResult:
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)  # the auditor's coins: which canaries go in
    model, tokenizer = build_model(cfg, len(SYNTHETIC_LABELS))
    canaries = make_canaries(m, rng, tokenizer)
    included = rng.random(m) < 0.5
    canary_ds = encode(canaries, SYNTHETIC_LABELS, tokenizer, cfg.max_length)
    datasets = []
    for pid in range(owners):
        frame = client_partition(cfg, pid)[["text", "label"]]
        if pid == 0:
            frame = pd.concat([frame, canaries[included]], ignore_index=True)
        datasets.append(encode(frame, SYNTHETIC_LABELS, tokenizer, cfg.max_length))
    plans = [plan_privacy(cfg, len(ds)) if cfg.dp else None for ds in datasets]
    ledgers = [PrivacyLedger(cfg.delta, cfg.target_epsilon) if cfg.dp else None for _ in datasets]

    keys = sorted(trainable_state(model))
    labels = canary_ds.tensors[2].numpy()
    global_state = trainable_state(model)
    initial_losses = _losses(model, canary_ds)
    round_scores = np.zeros(m)
    for rnd in range(1, cfg.rounds + 1):
        load_trainable_state(model, global_state)
        grads = _unit_gradients(model, canary_ds, keys)  # the attacker holds the round's starting global
        deltas = []
        for ds, plan, ledger in zip(datasets, plans, ledgers):
            load_trainable_state(model, global_state)
            train_local(model, ds, cfg, ledger, plan, server_round=rnd)
            deltas.append(_flat(trainable_state(model), keys) - _flat(global_state, keys))
        step = np.mean(deltas, axis=0)  # equal weights, as under DP; this is what the server learns
        # a canary that trained pushed the adapter and head down its own loss
        round_scores += standardise(grads @ (-step), labels) / math.sqrt(cfg.rounds)
        global_state = _unflat(_flat(global_state, keys) + step, global_state, keys)
    load_trainable_state(model, global_state)
    final_scores = center_by_label(initial_losses - _losses(model, canary_ds), labels)
    # the server that saw every round also holds the final model: it adds the final attacker's evidence
    round_scores = standardise(round_scores, labels) + standardise(final_scores, labels)
    delta = cfg.delta if cfg.dp else 0.0
    return RunResult(
        dp=f"eps={cfg.target_epsilon:g}" if cfg.dp else "off",
        claimed_epsilon=cfg.target_epsilon if cfg.dp else None,
        spent_epsilon=ledgers[0].epsilon() if cfg.dp else None,
        canaries=m, included=int(included.sum()), owner_examples=len(datasets[0]),
        final=audit_scores(final_scores, included, delta), rounds=audit_scores(round_scores, included, delta),
        seconds=round(time.perf_counter() - t0, 1),
        raw={"included": included.astype(int).tolist(), "labels": labels.tolist(),
             "final_scores": final_scores.round(8).tolist(), "round_scores": round_scores.round(8).tolist()},
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", action="append", default=None, help="'off' or a target epsilon; repeat (default: off 1 8)")
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=1, help="independent runs per setting (seeds seed..seed+runs-1)")
    ap.add_argument("--owners", type=int, default=1,
                    help="owners in the federation (owner 0 holds the canaries); with 1 the per-round aggregate is "
                         "that owner's own update, the worst case (every other owner colluding with the server)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="runs/audit.json")
    ap.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("overrides", nargs="*", help="FedConfig key=value, e.g. model=minilm rounds=4")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = {"model": "minilm", "brands": args.owners, "num_clients": args.owners, "examples_per_brand": 400,
            "max_length": 32, "output": ""}
    for item in args.overrides:
        key, _, value = item.partition("=")
        base[key.replace("_", "-")] = value
    cfg = FedConfig.from_run_config({k.replace("_", "-"): v for k, v in base.items()})

    results = []
    for setting in args.dp or ["off", "1", "8"]:
        run_cfg = cfg.replace(dp=False) if setting == "off" else cfg.replace(dp=True, target_epsilon=float(setting))
        for i in range(args.runs):
            res = run_once(run_cfg, args.canaries, args.seed + i, args.owners)
            results.append(res)
            print(f"[{res.dp} run {i}] final eps_lb {res.final['epsilon_lb']:.3f} (auc {res.final['auc']:.3f}), "
                  f"rounds eps_lb {res.rounds['epsilon_lb']:.3f} (auc {res.rounds['auc']:.3f}), {res.seconds} s",
                  file=sys.stderr, flush=True)

    header = f"{'DP':>8} {'claimed':>8} {'spent':>7} {'runs':>4} {'m':>5} {'in':>4} | " \
             f"{'final: eps_lb':>13} {'AUC':>5} {'v/r':>9} | {'rounds: eps_lb':>14} {'AUC':>5} {'v/r':>9}"
    print(header)
    print("-" * len(header))
    for res in results:
        claimed = f"{res.claimed_epsilon:g}" if res.claimed_epsilon else "-"
        spent = f"{res.spent_epsilon:.2f}" if res.spent_epsilon is not None else "-"
        f, r = res.final, res.rounds
        print(f"{res.dp:>8} {claimed:>8} {spent:>7} {1:>4} {res.canaries:>5} {res.included:>4} | "
              f"{f['epsilon_lb']:>13.3f} {f['auc']:>5.3f} {f['correct']:>4}/{f['guesses']:<4} | "
              f"{r['epsilon_lb']:>14.3f} {r['auc']:>5.3f} {r['correct']:>4}/{r['guesses']:<4}")
    out = {"method": "Steinke, Nasr, Jagielski 2023 (one run), 95% confidence, Bonferroni over k",
           "config": cfg.to_run_config(), "owners": args.owners, "results": [asdict(r) for r in results]}
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as fh:
            json.dump(out, fh, indent=2)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
