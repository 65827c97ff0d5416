"""Federated k-means on sentence embeddings: the parts the owners, the server and the benchmark share.

Each round the server sends centroids; each owner assigns its customers' embeddings (clipped
to norm 1), and releases per-cluster sums and counts with Gaussian noise from its own
CSPRNG; the noisy statistics are summed by secure aggregation and the server divides.

Sensitivity: adding or removing one customer changes one cluster's sum by a vector of norm
<= 1 and the same cluster's count by 1. Counts are released multiplied by COUNT_WEIGHT, so
the released vector (sums, COUNT_WEIGHT * counts) moves by at most
SENSITIVITY = sqrt(1 + COUNT_WEIGHT^2) in L2, and noise of std `z * SENSITIVITY` on every
coordinate is the Gaussian mechanism with noise multiplier z (RDP accountant, sample rate 1,
one step). A count of ~hundreds needs far less relative precision than a 384-dimensional
sum, so down-weighting the count spends most of the sensitivity on the sums (the count's
own noise grows by 1/COUNT_WEIGHT, the sums' shrinks by sqrt(2)/SENSITIVITY).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from shared.atomic import atomic_write
from shared.cache import cache_dir

COUNT_WEIGHT = 0.3
SENSITIVITY = math.sqrt(1.0 + COUNT_WEIGHT**2)
STATS_BOUND = float(2**20)
"""Declared bound on |coordinate| of one owner's released statistics in the secure-aggregation
ring (a count or a sum over at most ~1M customers per cluster); larger values are clipped."""

FINAL_SHARE = 0.4
"""Share of the privacy budget (in RDP, i.e. of sum 1/z^2) spent on the last round: the final
centroids are the ones the objective and the owners' segments use; earlier rounds only have
to move the centroids in the right direction."""


# --- geometry -------------------------------------------------------------------------

def clip_rows(x: np.ndarray, bound: float = 1.0) -> np.ndarray:
    """Rows scaled down to norm <= bound: the sensitivity argument holds whatever the encoder outputs."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(1.0, norms / bound)


def sq_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return np.maximum(d, 0.0)


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return sq_distances(x, centroids).argmin(1)


def objective(x: np.ndarray, centroids: np.ndarray) -> float:
    """The k-means objective: sum of squared distances to the nearest centroid."""
    return float(sq_distances(x, centroids).min(1).sum())


def cluster_stats(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[sum of each cluster's points (k*d) ..., COUNT_WEIGHT * count of each cluster (k)], float64."""
    k, d = centroids.shape
    labels = assign(x, centroids)
    sums = np.zeros((k, d))
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return np.concatenate([sums.reshape(-1), COUNT_WEIGHT * counts])


def split_stats(stats: np.ndarray, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    return stats[: k * d].reshape(k, d), stats[k * d:] / COUNT_WEIGHT


def min_count(noise_multiplier: float, contributors: int) -> float:
    """A cluster whose noisy count is below three noise standard deviations keeps its previous
    centroid: dividing a noisy sum by a count near zero would throw the centroid anywhere."""
    return 3.0 * noise_multiplier * SENSITIVITY / COUNT_WEIGHT * math.sqrt(max(1, contributors))


def update_centroids(stats: np.ndarray, previous: np.ndarray, floor: float, center: np.ndarray | None = None,
                     noise_var: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """New centroids from summed (noisy) statistics; post-processing only.

    A cluster whose noisy count is below `floor` keeps its previous centroid. With `center`
    (the federated mean) and `noise_var` (the variance of each summed coordinate's noise),
    each noisy mean is shrunk towards the center by the positive-part James-Stein factor
    1 - d * noise_var / (count^2 * |mean - center|^2): isotropic noise in d = 384 dimensions
    otherwise pushes every centroid away from the data (on the airline tweets this takes the
    objective gap to pooled k-means from ~7% to ~4%). A mean of points in the unit ball lies
    in the unit ball, so the result is projected back onto it."""
    k, d = previous.shape
    sums, counts = split_stats(stats, k, d)
    out = previous.copy()
    for j in range(k):
        if counts[j] >= floor and counts[j] > 0:
            c = sums[j] / counts[j]
            if center is not None and noise_var > 0:
                offset = c - center
                norm2 = float(offset @ offset)
                factor = max(0.0, 1.0 - d * noise_var / (counts[j] ** 2 * norm2)) if norm2 > 0 else 0.0
                c = center + factor * offset
            out[j] = c / max(1.0, float(np.linalg.norm(c)))
    return out, counts


def initial_directions(k: int, d: int, seed: int) -> np.ndarray:
    """k random orthonormal directions from the run seed (public, data-independent)."""
    g = np.random.default_rng([seed, 0x5E6])
    q, _ = np.linalg.qr(g.normal(size=(d, max(k, 1))))
    return q[:, :k].T.copy() if k <= d else g.normal(size=(k, d)) / math.sqrt(d)


def centered_init(mean: np.ndarray, k: int, seed: int, radius: float) -> np.ndarray:
    """k-means++-like spread without touching a raw point: the noisy federated mean plus k
    orthogonal random offsets of length `radius` (the data's noisy RMS spread). Assigning to
    these splits the data by random hyperplanes through its mean, so every cell is populated."""
    dirs = initial_directions(k, mean.shape[0], seed)
    c = mean[None, :] + radius * dirs
    return c / np.maximum(1.0, np.linalg.norm(c, axis=1, keepdims=True))


# --- embeddings -----------------------------------------------------------------------

def embed(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 64) -> np.ndarray:
    """Normalised sentence embeddings: the masked mean of the encoder's last hidden states
    (all-MiniLM-L6-v2's own pooling), for a base model or a PEFT checkpoint alike."""
    import torch

    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths share a batch: less padding
    out: np.ndarray | None = None
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start: start + batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            device = next(model.parameters()).device
            hidden = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                           output_hidden_states=True).hidden_states[-1]
            mask = enc["attention_mask"].to(device).unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            vec = torch.nn.functional.normalize(mean.float(), dim=-1).cpu().numpy()
            if out is None:
                out = np.zeros((len(texts), vec.shape[1]), dtype=np.float32)
            out[idx] = vec
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def embeddings_cached(encoder_id: str, texts: list[str], compute) -> np.ndarray:
    """Embeddings keyed by encoder and texts in the local cache (`$FEDLORA_CACHE/embeddings`):
    the owner's own machine, like its data. Rounds and reruns then skip the encoder."""
    root = cache_dir("embeddings")
    h = hashlib.sha256(encoder_id.encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace") + b"\0")
    path = root / f"{h.hexdigest()[:32]}.npy"
    if path.exists():
        try:
            x = np.load(path)
            if x.shape[0] == len(texts):
                return x
        except (OSError, ValueError):
            pass
    x = compute(texts)
    try:  # private: derived from the owner's texts
        atomic_write(path, lambda fh: np.save(fh, x), private=True)
    except OSError:
        pass  # a read-only or full cache only costs the next run the encoder pass
    return x


# --- descriptions (computed by each owner on its own rows, never sent) ------------------

_WORD = re.compile(r"[a-z][a-z'\-]{2,}")
_STOP = frozenset("""the and for you your with that this are was were have has had not but they them their our out
from just what when will can all get got been about would there here how who why its it's i'm you're don't can't
did does didn't doesn't isn't aren't won't one more very too now then than also any some into over only still
user http amp via""".split())


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def describe_segments(texts: list[str], x: np.ndarray, centroids: np.ndarray, labels: np.ndarray,
                      n_texts: int = 5, n_words: int = 10) -> list[dict]:
    """Per segment: its size here, the texts nearest its centroid, and the words most over-represented
    in it against this owner's other rows (log-odds with add-one smoothing, at least 3 uses)."""
    dist = sq_distances(x, centroids) if len(x) else np.zeros((0, len(centroids)))
    docs = [_words(t) for t in texts]
    total = Counter(w for doc in docs for w in set(doc))
    out = []
    for j in range(len(centroids)):
        rows = np.flatnonzero(labels == j)
        inside = Counter(w for i in rows for w in set(docs[i]))
        n_in, n_out = len(rows), len(texts) - len(rows)
        scores = {}
        for w, c in inside.items():
            if c >= 3:
                rest = total[w] - c
                scores[w] = math.log((c + 1) / (n_in + 2)) - math.log((rest + 1) / (n_out + 2))
        top = sorted(scores, key=lambda w: (-scores[w], w))[:n_words]
        typical = rows[np.argsort(dist[rows, j], kind="stable")[:n_texts]] if n_in else []
        out.append({"segment": j, "size": int(n_in), "top_words": top, "typical_texts": [texts[i] for i in typical]})
    return out


def write_owner_outputs(folder: Path, frame: pd.DataFrame, labels: np.ndarray, distances: np.ndarray,
                        descriptions: list[dict]) -> None:
    """segments.csv (the owner's rows with their segment and distance) and segments.md (a
    description of each segment a person can read), written atomically."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    table = frame.copy()
    table["segment"] = labels.astype(int)
    table["distance"] = distances
    atomic_write(folder / "segments.csv", table.to_csv(index=False))
    lines = ["# Segments of this owner's customers", ""]
    for s in descriptions:
        lines += [f"## Segment {s['segment']} ({s['size']} customers)", "",
                  "Top words: " + (", ".join(s["top_words"]) or "(too few customers)"), "", "Most typical:"]
        lines += [f"- {t}" for t in s["typical_texts"]] + [""]
    atomic_write(folder / "segments.md", "\n".join(lines))
    atomic_write(folder / "segments.json", json.dumps(descriptions, indent=1))


# --- privacy schedule -------------------------------------------------------------------

INIT_SHARE = 0.05
"""Share of the budget for the first release, the federated mean (one count of every customer
and one sum: its noise is tiny against ~thousands of rows)."""


def budget_shares(releases: int) -> list[float]:
    """Shares of the RDP budget per release: the mean, the Lloyd rounds, the final round (at
    least an equal share of what the Lloyd rounds get)."""
    if releases < 2:
        raise ValueError("federated k-means needs the mean release and at least one Lloyd round")
    lloyd = releases - 1
    final = max(FINAL_SHARE, (1.0 - INIT_SHARE) / lloyd)
    middle = (1.0 - INIT_SHARE - final) / (lloyd - 1) if lloyd > 1 else 0.0
    return [INIT_SHARE] + [middle] * (lloyd - 1) + [final]


def noise_schedule(target_epsilon: float, delta: float, releases: int) -> list[float]:
    """Noise multiplier of every release so that all of them together spend exactly
    `target_epsilon` at `delta` in Opacus's RDP accountant (the one the ledger keeps).

    Gaussian mechanisms at sample rate 1 compose in RDP as alpha/2 * sum(1/z_t^2), so the
    schedule is the shares times one budget B = sum(1/z_t^2), found by bisection."""
    return list(_schedule(float(target_epsilon), float(delta), int(releases)))


def _epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Uncached on purpose: the bisection below asks about a new noise level every step, so
    `client.privacy.history_epsilon`'s per-(noise, rate) cache would only fill with levels
    never asked again and push out the ledgers' entries (at rate 1 the RDP is closed-form)."""
    from opacus.accountants import RDPAccountant

    from client.privacy import ALPHAS

    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta, alphas=ALPHAS))


@lru_cache(maxsize=256)
def _schedule(target_epsilon: float, delta: float, releases: int) -> tuple[float, ...]:
    shares = budget_shares(releases)

    def zs(budget: float) -> list[float]:
        return [1.0 / math.sqrt(s * budget) for s in shares]

    lo, hi = 1e-8, 1e4
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if _epsilon([(z, 1.0, 1) for z in zs(mid)], delta) > target_epsilon:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-9:
            break
    return tuple(zs(lo))


# --- simulation: the owners' rows ---------------------------------------------------------

def _synthetic_train(cfg) -> pd.DataFrame:
    from shared.data import synthetic_federation

    return synthetic_federation(cfg.brands, cfg.examples_per_brand, cfg.test_size, cfg.seed)[0]


@lru_cache(maxsize=4)
def _owners(key: str) -> tuple[tuple[str, ...], tuple[pd.DataFrame, ...], tuple[str, ...]]:
    import json

    from shared.config import FedConfig
    from shared.data import check_columns, read_table
    from shared.errors import FedLoraError

    cfg = FedConfig.from_run_config(json.loads(key))
    source = cfg.data or "synthetic data"
    table = read_table(cfg.data) if cfg.data else _synthetic_train(cfg)
    check_columns(table, source, cfg.text_column)
    notes = []
    empty = table[cfg.text_column].isna() | (table[cfg.text_column].astype(str).str.strip() == "")
    if empty.all():
        raise FedLoraError(f"column {cfg.text_column!r} in {source} has no text")
    if empty.any():
        notes.append(f"{int(empty.sum())} rows without text were left out")
        table = table[~empty]
    table = table.reset_index(drop=True)
    if cfg.partition_by:
        check_columns(table, source, cfg.partition_by)
        column = table[cfg.partition_by]
        missing = column.isna() | (column.astype(str).str.strip() == "")
        if missing.any():
            notes.append(f"{int(missing.sum())} rows without a {cfg.partition_by!r} value were left out")
        groups = table[~missing].groupby(column[~missing].astype(str), sort=True)
        names, frames = zip(*[(str(n), g.reset_index(drop=True)) for n, g in groups])
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(table))
        parts = np.array_split(order, cfg.num_clients)
        names = tuple(f"partition-{i}" for i in range(cfg.num_clients))
        frames = tuple(table.iloc[np.sort(p)].reset_index(drop=True) for p in parts)
    kept = [i for i, f in enumerate(frames) if len(f) >= max(1, cfg.min_client_examples)]
    if len(kept) < len(frames):
        notes.append(f"{len(frames) - len(kept)} of {len(frames)} owners with fewer than {cfg.min_client_examples} "
                     "rows were left out (--min-client-examples)")
    if not kept:
        raise FedLoraError(f"no owner has at least {cfg.min_client_examples} rows")
    return tuple(names[i] for i in kept), tuple(frames[i] for i in kept), tuple(notes)


def simulation_owners(cfg) -> tuple[tuple[str, ...], tuple[pd.DataFrame, ...], tuple[str, ...]]:
    """(names, frames, notes) of the simulated owners: one per `--partition-by` value, or an iid
    split. No label column is needed, so this does not go through the training partitioner
    (shared/data.py), which requires one."""
    import json

    keys = ("data", "text_column", "partition_by", "num_clients", "min_client_examples", "brands",
            "examples_per_brand", "test_size", "seed")
    return _owners(json.dumps({k.replace("_", "-"): getattr(cfg, k) for k in keys}, sort_keys=True))
