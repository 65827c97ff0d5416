"""Data: a synthetic marketing federation, or the owner's own files, partitioned.

Every process derives the same split and partitions from the config and seed, so a
simulated client only ever touches its own partition and the server only the test split.
Partitioning uses flwr-datasets partitioners.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import datasets
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

from shared.config import FedConfig
from shared.errors import FedLoraError
from shared.tasks import get_task

SYNTHETIC_LABELS = ["negative", "positive"]

datasets.disable_progress_bars()  # partitioning is instant; bars would only clutter the run's output

# --- synthetic federation -------------------------------------------------------------

_CATEGORIES = {
    "electronics": ["headphones", "charger", "smartwatch", "speaker", "tablet", "keyboard", "webcam"],
    "beauty": ["serum", "lipstick", "moisturizer", "shampoo", "perfume", "face mask", "sunscreen"],
    "grocery": ["coffee beans", "olive oil", "granola", "tea", "pasta sauce", "chocolate", "honey"],
    "fashion": ["sneakers", "jacket", "dress", "jeans", "handbag", "scarf", "boots"],
    "home": ["blender", "vacuum", "lamp", "mattress", "cookware set", "towels", "air purifier"],
    "travel": ["hotel stay", "flight", "suitcase", "city tour", "rental car", "backpack", "cruise"],
    "fitness": ["yoga mat", "protein powder", "dumbbells", "running shoes", "gym membership", "bike"],
    "banking": ["credit card", "savings account", "mobile app", "loan", "support line", "debit card"],
}
_POSITIVE = [
    "works perfectly", "exceeded my expectations", "great value for the money", "arrived quickly",
    "I love it", "would definitely buy again", "excellent quality", "the staff were so helpful",
    "highly recommend", "does exactly what it promised", "five stars", "super comfortable",
]
_NEGATIVE = [
    "stopped working after a week", "a complete waste of money", "arrived broken", "I want a refund",
    "terrible quality", "would never buy again", "the support was useless", "cheap and flimsy",
    "very disappointed", "nothing like the description", "one star", "took forever to arrive",
]
_BRAND_SLANG = [
    ("total win", "total fail"), ("chef's kiss", "hard pass"), ("a keeper", "a dud"),
    ("top notch", "rubbish"), ("spot on", "way off"), ("brilliant", "dreadful"),
    ("solid pick", "big letdown"), ("worth it", "not worth it"),
]
_OPENERS = ["", "Honestly, ", "Update: ", "So, ", "Bought this last month. ", "Ordered for my family. "]
_FILLER = ["the packaging", "the color", "delivery", "the price", "the size", "the app", "checkout"]


def _review(rng: random.Random, brand: str, items: list[str], slang: tuple[str, str], positive: bool) -> str:
    item = rng.choice(items)
    main = rng.choice(_POSITIVE if positive else _NEGATIVE)
    local = slang[0] if positive else slang[1]
    style = rng.random()
    if style < 0.25:  # mixed review: the clause after "but" carries the label
        aside = rng.choice(_NEGATIVE if positive else _POSITIVE)
        return f"{rng.choice(_OPENERS)}The {item} from {brand}: {aside}, but overall {main}."
    if style < 0.5:
        return f"{rng.choice(_OPENERS)}{brand} {item}, {local}. {main.capitalize()}."
    if style < 0.75:
        return f"{rng.choice(_OPENERS)}My {item} {main}. Not sure about {rng.choice(_FILLER)} though."
    return f"{main.capitalize()}! The {item} is {local}."


def synthetic_federation(num_brands: int, examples_per_brand: int, test_size: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Non-IID review data: each brand has its own categories, slang and label skew."""
    rng = random.Random(seed)
    categories = list(_CATEGORIES)
    brands = []
    for b in range(num_brands):
        cats = rng.sample(categories, 2)
        brands.append({
            "brand": f"brand-{b:03d}",
            "items": [i for c in cats for i in _CATEGORIES[c]],
            "slang": _BRAND_SLANG[b % len(_BRAND_SLANG)],
            "p_positive": rng.uniform(0.2, 0.8),
            "category": cats[0],
        })

    def draw(n_per_brand: int, balanced: bool) -> pd.DataFrame:
        rows = []
        for spec in brands:
            for _ in range(n_per_brand):
                positive = rng.random() < (0.5 if balanced else spec["p_positive"])
                rows.append({
                    "text": _review(rng, spec["brand"], spec["items"], spec["slang"], positive),
                    "label": SYNTHETIC_LABELS[int(positive)],
                    "brand": spec["brand"],
                    "category": spec["category"],
                })
        return pd.DataFrame(rows)

    train = draw(examples_per_brand, balanced=False)
    test = draw(max(1, test_size // num_brands), balanced=True)
    return train, test


# Click data: customers click offers for what they already buy, in the style their age
# group answers, more often when they read their email. The rule is the same at every
# brand; what differs is who shops there (each brand's categories and age mix), so each
# brand's customers click different offers and a model trained across brands sees more of
# the rule than any brand alone.
_OFFER_STYLES = {
    "young": ["flash sale: 30% off {item}", "new drop: {item}, limited edition", "{item} trending now, shop the look"],
    "older": ["free shipping on {item}", "loyalty points x3 on {item}", "{item} with a 2-year warranty"],
}
_ENGAGEMENT = [("rarely opens emails", -1.0), ("opens some emails", 0.0), ("opens most emails", 1.0)]


def synthetic_clicks(num_brands: int, examples_per_brand: int, test_size: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Profile/offer pairs with a 0/1 click label, one brand per data owner (non-IID)."""
    rng = random.Random(seed)
    categories = list(_CATEGORIES)
    brands = [{"brand": f"brand-{b:03d}", "cats": rng.sample(categories, 2), "young": rng.uniform(0.2, 0.8)}
              for b in range(num_brands)]

    def row(spec: dict) -> dict:
        young = rng.random() < spec["young"]
        age = rng.randint(18, 32) if young else rng.randint(40, 70)
        interest = rng.choice(spec["cats"]) if rng.random() < 0.75 else rng.choice(categories)
        bought = rng.sample(_CATEGORIES[interest], 2)
        engagement, engaged = rng.choice(_ENGAGEMENT)
        offer_cat = rng.choice(spec["cats"]) if rng.random() < 0.5 else rng.choice(categories)
        style = rng.choice(list(_OFFER_STYLES))
        logit = -2.2 + 3.0 * (offer_cat == interest) + 1.5 * (style == ("young" if young else "older")) + 1.0 * engaged
        return {
            "profile": f"age {age}; bought: {bought[0]}, {bought[1]}; viewed: {rng.choice(_CATEGORIES[interest])}; {engagement}",
            "offer": rng.choice(_OFFER_STYLES[style]).format(item=rng.choice(_CATEGORIES[offer_cat])),
            "label": str(int(rng.random() < 1.0 / (1.0 + np.exp(-logit)))),
            "brand": spec["brand"],
        }

    train = pd.DataFrame([row(spec) for spec in brands for _ in range(examples_per_brand)])
    test = pd.DataFrame([row(spec) for spec in brands for _ in range(max(1, test_size // num_brands))])
    return train, test


# Copy data: each brand writes in its own tone (playful, premium, caring, bold), and the
# tone shifts by channel (an email is fuller, an SMS is clipped, a social post has a
# hashtag); what a segment hears (welcome, we miss you, a deal) is the same at every
# brand. The prompt names the brand, the segment, the product and the channel, so a model
# trained across brands learns every tone and the shared segment phrasing.
_COPY_BRANDS = ["Northpeak", "Lumen", "Harbor & Co", "Vela", "Brightside", "Kestrel", "Oakline", "Mira"]
_SEGMENTS = {
    "new subscribers": ("new friend", "Welcome aboard!"),
    "lapsed buyers": ("old friend", "We have missed you."),
    "loyal customers": ("insider", "Thanks for sticking with us."),
    "bargain hunters": ("deal seeker", "Our best price this season."),
    "young shoppers": ("trendsetter", "Fresh for the new season."),
    "families": ("family", "Made for busy homes."),
}
_CHANNELS = ("email", "sms", "social")
_TONES = {
    "playful": {
        "email": ["Subject: Your {item} is calling! Hey {call}, {line} Grab a new {item} from {brand} with {pct}% off. Go on, treat yourself!",
                  "Subject: Psst, {call}! {line} The {item} you will not stop smiling about is {pct}% off at {brand} this week."],
        "sms": ["{brand}: hey {call}! {item} at {pct}% off, today only. Tap to grab it!",
                "{brand}: {pct}% off {item}, {call}! Quick, tap before it's gone!"],
        "social": ["Who else needs a new {item}? {line} {pct}% off at {brand} all week! #{tag}",
                   "Plot twist: your {item} just got {pct}% cheaper. {line} #{tag}"],
    },
    "premium": {
        "email": ["Subject: Crafted for you. Dear {call}, {line} Discover the {item}, made with care by {brand}. Enjoy {pct}% off as our guest.",
                  "Subject: An invitation from {brand}. Dear {call}, {line} Our {item} is yours at {pct}% off, for a limited time."],
        "sms": ["{brand}: Dear {call}, the {item} awaits. {pct}% off, by invitation only.",
                "{brand}: An exclusive {pct}% off our {item}, reserved for you."],
        "social": ["Quiet luxury, made to last: the {brand} {item}. {line} #{tag}",
                   "The {item}, refined. {line} Now {pct}% off at {brand}. #{tag}"],
    },
    "caring": {
        "email": ["Subject: Something good for you. Hi {call}, {line} We picked the {item} with you in mind, and it is {pct}% off at {brand}. Take care!",
                  "Subject: A little help from {brand}. Hi {call}, {line} Our {item} makes the day easier, now {pct}% off. We are here if you need us."],
        "sms": ["{brand}: Hi {call}, a little gift: {pct}% off the {item}. Take care!",
                "{brand}: Thinking of you, {call}. The {item} is {pct}% off this week."],
        "social": ["Small comforts matter. {line} The {item} is {pct}% off at {brand}. #{tag}",
                   "Made with care, shared with you: our {item}. {line} #{tag}"],
    },
    "bold": {
        "email": ["Subject: NO LIMITS. {call}, {line} The {item} from {brand} is built to perform. {pct}% off. Move now.",
                  "Subject: Level up, {call}. {line} {brand} {item}. {pct}% off. Zero excuses."],
        "sms": ["{brand}: {item}. {pct}% off. Now, {call}. Go!",
                "{brand}: Stop waiting, {call}. {item} {pct}% off. Today."],
        "social": ["Built different. The {brand} {item}, {pct}% off. {line} #{tag}",
                   "Go hard. {item}, {pct}% off at {brand}. #{tag}"],
    },
}


def synthetic_copy(num_brands: int, examples_per_brand: int, test_size: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prompt/response pairs (segment, product, channel -> copy), one brand per data owner:
    each brand has its own products, tone and channel mix (non-IID)."""
    rng = random.Random(seed)
    tones = list(_TONES)
    brands = []
    for b in range(num_brands):
        name = _COPY_BRANDS[b % len(_COPY_BRANDS)] + (f" {b // len(_COPY_BRANDS) + 1}" if b >= len(_COPY_BRANDS) else "")
        cats = rng.sample(list(_CATEGORIES), 2)
        brands.append({"brand": f"brand-{b:03d}", "name": name, "tone": tones[b % len(tones)],
                       "items": [i for c in cats for i in _CATEGORIES[c]], "tag": name.replace(" ", "").replace("&", "And"),
                       "channels": [rng.uniform(0.5, 2.0) for _ in _CHANNELS]})

    def row(spec: dict) -> dict:
        segment = rng.choice(list(_SEGMENTS))
        channel = rng.choices(_CHANNELS, weights=spec["channels"])[0]
        item = rng.choice(spec["items"])
        call, line = _SEGMENTS[segment]
        copy = rng.choice(_TONES[spec["tone"]][channel]).format(
            brand=spec["name"], item=item, call=call, line=line, pct=rng.choice((10, 15, 20, 25, 30)), tag=spec["tag"])
        return {"prompt": f"Brand: {spec['name']}. Segment: {segment}. Product: {item}. Channel: {channel}. Write the copy.",
                "response": copy, "brand": spec["brand"], "segment": segment, "channel": channel}

    train = pd.DataFrame([row(spec) for spec in brands for _ in range(examples_per_brand)])
    test = pd.DataFrame([row(spec) for spec in brands for _ in range(max(1, test_size // num_brands))])
    return train, test


# --- files ---------------------------------------------------------------------------

def read_table(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise FedLoraError(f"data file not found: {path}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv":
            df = pd.read_csv(p)
        elif suffix == ".tsv":
            df = pd.read_csv(p, sep="\t")
        elif suffix in (".jsonl", ".json"):
            df = pd.read_json(p, lines=suffix == ".jsonl")
        elif suffix == ".parquet":
            df = pd.read_parquet(p)
        else:
            raise FedLoraError(f"unsupported data format {suffix!r} for {path}: use .csv, .tsv, .jsonl or .parquet")
    except FedLoraError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types for malformed files
        raise FedLoraError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if df.empty:
        raise FedLoraError(f"data file is empty: {path}")
    return df


def check_columns(df: pd.DataFrame, path: str, *columns: str) -> None:
    for column in columns:
        if column and column not in df.columns:
            raise FedLoraError(f"column {column!r} not in {path} (columns: {', '.join(map(str, df.columns))})")


def normalize(df: pd.DataFrame, cfg: FedConfig, path: str, require_label: bool = True) -> pd.DataFrame:
    """The task's input columns under their canonical names ('text', and 'text_pair' for
    pairs) and the label as a string under 'label'; other columns are kept (owners, ids).
    Without `require_label` (scoring new rows) a missing label column is fine."""
    task = get_task(cfg)
    inputs = task.columns(cfg)
    if task.generative:
        return _normalize_pairs(df, cfg, path, inputs, task.target(cfg), require_label)
    has_label = cfg.label_column in df.columns
    check_columns(df, path, *inputs.values(), *((cfg.label_column,) if require_label or has_label else ()))
    out = pd.DataFrame({name: df[column].astype(str) for name, column in inputs.items()})
    if has_label:
        out["label"] = df[cfg.label_column].map(_label_str)
    for column in df.columns:
        if column not in (*inputs.values(), cfg.label_column):
            out[column] = df[column]
    if has_label and out["label"].isna().any():
        raise FedLoraError(f"{path}: column {cfg.label_column!r} has {int(out['label'].isna().sum())} empty labels")
    return out


def _normalize_pairs(df: pd.DataFrame, cfg: FedConfig, path: str, inputs: dict[str, str], target: str,
                     require_response: bool) -> pd.DataFrame:
    """Generative tasks: the prompt under 'text', the target text under 'response' (required
    to train or evaluate, optional to generate); an empty prompt or response is an error."""
    has_response = target in df.columns
    check_columns(df, path, *inputs.values(), *((target,) if require_response or has_response else ()))
    out = pd.DataFrame({name: df[column] for name, column in inputs.items()})
    used = [*inputs.values()]
    if has_response:
        out["response"] = df[target]
        used.append(target)
    for name, column in (*inputs.items(), *((("response", target),) if has_response else ())):
        empty = out[name].isna() | (out[name].astype(str).str.strip() == "")
        if empty.any():
            kind = "responses" if name == "response" else "prompts"
            raise FedLoraError(f"{path}: column {column!r} has {int(empty.sum())} empty {kind} "
                               f"(first at row {int(empty.to_numpy().nonzero()[0][0])})")
        out[name] = out[name].astype(str)
    for column in df.columns:
        if column not in used:
            out[column] = df[column]
    return out


def _label_str(value) -> str | None:
    if pd.isna(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def derive_labels(train: pd.DataFrame) -> list[str]:
    values = sorted(set(train["label"]))
    if all(v.lstrip("-").isdigit() for v in values):
        values = sorted(values, key=int)
    return values


@dataclass
class FederatedData:
    test: pd.DataFrame
    labels: list[str]
    rows_key: str

    @property
    def train(self) -> pd.DataFrame:
        """The whole federation's training rows (simulation only), read or generated again on
        each access and not kept: the server needs only the test rows, and the clients cut
        their partitions from the memory-mapped copy (`_partition_rows`), so no process holds
        a second copy of every owner's data for the whole run."""
        return _rows(self.rows_key)[0]


def _test_file_only(cfg: FedConfig) -> bool:
    """Deployment: the server holds only a held-out test file; the owners keep the training rows."""
    return not cfg.data and bool(cfg.test_data)


def _rows(rows_key: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train and test rows, whatever `--labels` says; not cached (see `FederatedData.train`)."""
    cfg = FedConfig.from_run_config(json.loads(rows_key))
    if _test_file_only(cfg):
        test = normalize(read_table(cfg.test_data), cfg, cfg.test_data)
        train = test.iloc[0:0]
    elif not cfg.data:
        generate = {"click": synthetic_clicks, "generate": synthetic_copy}.get(cfg.task, synthetic_federation)
        train, test = generate(cfg.brands, cfg.examples_per_brand, cfg.test_size, cfg.seed)
        synthetic = FedConfig(task=cfg.task)  # the generators write the default column names
        train, test = normalize(train, synthetic, "synthetic data"), normalize(test, synthetic, "synthetic data")
    else:
        train = normalize(read_table(cfg.data), cfg, cfg.data)
        if cfg.test_data:
            test = normalize(read_table(cfg.test_data), cfg, cfg.test_data)
        else:
            test = train.sample(frac=0.2, random_state=cfg.seed)
            train = train.drop(test.index)
    return train.reset_index(drop=True), test.reset_index(drop=True)


@lru_cache(maxsize=4)
def _load(cfg_key: str) -> FederatedData:
    cfg = FedConfig.from_run_config(json.loads(cfg_key))
    rows_key = _data_key(cfg, rows_only=True)
    train, test = _rows(rows_key)
    if not cfg.data and not cfg.test_data:
        labels = SYNTHETIC_LABELS if cfg.task == "classify" else None
    else:
        source = test if _test_file_only(cfg) else train
        labels = cfg.label_names or (derive_labels(source) if "label" in source.columns else [])
    task = get_task(cfg)
    labels = list(task.labels if task.labels is not None else labels)  # a fixed label set (click: 0/1; generate: none)
    unknown = sorted(set(test["label"]) - set(labels)) if "label" in test.columns else []
    if unknown:
        raise FedLoraError(f"test data has labels the training data lacks: {', '.join(unknown[:5])}")
    return FederatedData(test, labels, rows_key)


def _data_key(cfg: FedConfig, rows_only: bool = False) -> str:
    """What the loaded data depends on. `rows_only`: the training rows alone, which `--labels`
    does not change (it only names and orders the label set): the server runs with the label
    set filled in, and must still find the partitions, their cache file and the rows it
    already loaded, rather than load the federation a second time."""
    keys = ("task", "data", "test_data", "text_column", "label_column", "profile_column", "offer_column", "prompt_column",
            "response_column", "labels", "brands",
            "examples_per_brand", "test_size", "seed")
    return json.dumps({k: getattr(cfg, k) for k in keys if not (rows_only and k == "labels")}, sort_keys=True)


def load_federation(cfg: FedConfig) -> FederatedData:
    """Train/test split and the global label set, identical in every process."""
    return _load(_data_key(cfg))


def with_labels(cfg: FedConfig, fed: FederatedData) -> FedConfig:
    """`cfg` naming the federation's label set, as the server sends it to its clients (they
    size the head and the automatic probe length from it); a set already named is kept."""
    return cfg if cfg.labels else cfg.replace(labels=json.dumps(fed.labels))


@dataclass
class Partitioning:
    """The virtual clients of a simulation: which underlying partitions are kept, and why not the rest."""

    partitioner: object
    kept: list[int]  # underlying partition id of each virtual client
    names: list[str]  # an owner's name (its natural id), or "partition-N"
    sizes: list[int]
    notes: list[str]  # what was dropped and why, for the person running the simulation


def _partitioner(cfg: FedConfig):
    if cfg.partition_by:
        return NaturalIdPartitioner(partition_by=cfg.partition_by)
    if cfg.dirichlet_alpha is not None:
        return DirichletPartitioner(
            num_partitions=cfg.num_clients, partition_by="label", alpha=cfg.dirichlet_alpha,
            min_partition_size=0, self_balancing=True, seed=cfg.seed,
        )
    return IidPartitioner(num_partitions=cfg.num_clients)


PARTITION_CACHE_VERSION = 1
"""Bumped whenever the stored rows' layout changes, so an older cache entry is never read."""


def _source_stamp(cfg: FedConfig) -> list:
    """What identifies an owner's files on disk: path, size and modification time (a changed
    file is a new cache entry); synthetic data is identified by its config alone."""
    stamp = []
    for path in (cfg.data, cfg.test_data):
        if path:
            st = Path(path).stat()
            stamp.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    return stamp


def _partition_rows(cfg: FedConfig, cfg_key: str) -> tuple[Dataset, list[str]]:
    """The training rows the partitioner cuts, memory-mapped from an Arrow copy in the cache.

    Every simulation process needs them, but a worker only reads the rows of the clients it
    serves: mapped from one file they sit once in the page cache and only the touched pages
    count against a worker, where an in-memory copy per process cost 125 MB each at 500,000
    rows. The driver writes the file (its preflight partitions first); a worker that finds
    none, or a torn one, rebuilds it from the data, and a cache that cannot be written only
    costs the in-memory copy."""
    import hashlib
    import shutil

    from shared.cache import cache_dir

    key = json.dumps([PARTITION_CACHE_VERSION, cfg_key, cfg.partition_by, _source_stamp(cfg)])
    folder = cache_dir("partitions", hashlib.sha256(key.encode()).hexdigest()[:32])
    try:
        return datasets.load_from_disk(str(folder / "rows")), json.loads((folder / "notes.json").read_text())
    except (OSError, ValueError):  # not built yet, or torn: (re)build it
        shutil.rmtree(folder, ignore_errors=True)  # complete entries appear by rename, whole
    train, notes = _rows(cfg_key)[0], []
    if cfg.partition_by:
        source = cfg.data or "synthetic data"
        check_columns(train, source, cfg.partition_by)
        column = train[cfg.partition_by]
        missing = column.isna() | (column.astype(str).str.strip() == "")
        if missing.all():
            raise FedLoraError(f"column {cfg.partition_by!r} in {source} has no values to partition by")
        if missing.any():
            notes.append(f"{int(missing.sum())} rows without a {cfg.partition_by!r} value were left out")
            train = train[~missing]
    table = train.astype({c: str for c in train.columns if c != "label"}).reset_index(drop=True)
    rows = Dataset.from_pandas(table, preserve_index=False)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        rows.save_to_disk(str(tmp / "rows"))
        (tmp / "notes.json").write_text(json.dumps(notes))
        tmp.rename(folder)
    except OSError:  # another process finished first, or no writable cache: keep what is there
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        return datasets.load_from_disk(str(folder / "rows")), notes
    except (OSError, ValueError):
        return rows, notes


@lru_cache(maxsize=4)
def _partitioning(cfg_key: str, part_key: str) -> Partitioning:
    cfg = FedConfig.from_run_config(json.loads(cfg_key) | json.loads(part_key))
    rows, notes = _partition_rows(cfg, cfg_key)
    partitioner = _partitioner(cfg)
    partitioner.dataset = rows
    if cfg.partition_by:
        import pyarrow.compute as pc

        names = [str(partitioner.partition_id_to_natural_id[i]) for i in range(partitioner.num_partitions)]
        counts = {str(v["values"]): int(v["counts"]) for v in pc.value_counts(rows.data.column(cfg.partition_by)).to_pylist()}
        sizes = [counts[n] for n in names]
    else:
        names = [f"partition-{i}" for i in range(partitioner.num_partitions)]
        sizes = []
        if isinstance(partitioner, IidPartitioner) and len(rows) >= partitioner.num_partitions:
            # contiguous equal shards (datasets' `shard`): sizes by arithmetic, not by cutting
            # each of thousands of partitions (4 ms each, in every worker process)
            div, mod = divmod(len(rows), partitioner.num_partitions)
            sizes = [div + (i < mod) for i in range(partitioner.num_partitions)]
        for i in range(len(sizes), partitioner.num_partitions):
            try:
                sizes.append(len(partitioner.load_partition(i)))
            except (IndexError, ValueError):  # flwr-datasets cannot cut more partitions than rows
                sizes.append(0)
    kept = [i for i, n in enumerate(sizes) if n >= max(1, cfg.min_client_examples)]
    dropped = [i for i in range(len(sizes)) if i not in kept]
    if dropped:
        notes.append(f"{len(dropped)} of {len(sizes)} owners with fewer than {cfg.min_client_examples} rows "
                     f"({sum(sizes[i] for i in dropped)} rows) were left out (--min-client-examples)")
    if not kept:
        raise FedLoraError(f"no partition has at least {cfg.min_client_examples} rows: lower --min-client-examples, "
                           "use fewer clients or a larger Dirichlet alpha")
    return Partitioning(partitioner, kept, [names[i] for i in kept], [sizes[i] for i in kept], notes)


def partitioning(cfg: FedConfig) -> Partitioning:
    key = json.dumps({"partition_by": cfg.partition_by, "partition": cfg.partition, "num_clients": cfg.num_clients,
                      "min_client_examples": cfg.min_client_examples}, sort_keys=True)
    return _partitioning(_data_key(cfg, rows_only=True), key)


def num_partitions(cfg: FedConfig) -> int:
    """Virtual clients of a simulation; in deployment (no training data here) the configured count."""
    if _test_file_only(cfg):
        return cfg.num_clients
    return len(partitioning(cfg).kept)


def client_partition(cfg: FedConfig, partition_id: int) -> pd.DataFrame:
    parts = partitioning(cfg)
    if not 0 <= partition_id < len(parts.kept):
        raise FedLoraError(f"partition {partition_id} does not exist ({len(parts.kept)} partitions)")
    part = parts.partitioner.load_partition(parts.kept[partition_id]).to_pandas()
    if part.empty:
        raise FedLoraError(f"partition {partition_id} is empty: use fewer clients or a larger Dirichlet alpha")
    return part


def row_owners(cfg: FedConfig, frame: pd.DataFrame) -> np.ndarray | None:
    """The owner of each row, when the frame has the partition column filled in (per-owner scores)."""
    if cfg.partition_by and cfg.partition_by in frame.columns and frame[cfg.partition_by].notna().all():
        return frame[cfg.partition_by].astype(str).to_numpy()
    return None


# --- tokens --------------------------------------------------------------------------

LENGTH_BUCKETS = (32, 64, 128, 256, 512)


def model_length_limit(tokenizer: PreTrainedTokenizerBase, model=None) -> int:
    """The longest input the model takes: its position table or the tokenizer's limit."""
    limits = [n for n in (getattr(tokenizer, "model_max_length", None),
                          getattr(getattr(model, "config", None), "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else 512


def choose_max_length(texts, tokenizer: PreTrainedTokenizerBase, cfg: FedConfig, model=None) -> int:
    """Token length for this data (texts, or a normalized frame: text pairs count together):
    `--max-length` when set, else from the data itself.

    The 95th percentile of the texts' token counts, rounded up to a coarse bucket
    (32, 64, 128, 256, 512) so the choice reveals little about any one text, and capped
    by `--max-length-cap` (a time and memory budget: attention cost grows with the square
    of the length) and the model's own limit. Rows are still trimmed to their batch's
    longest text, so a generous bucket costs nothing on short texts.
    """
    limit = model_length_limit(tokenizer, model)
    if cfg.max_length > 0:
        return min(cfg.max_length, limit)
    task = get_task(cfg)
    if task.token_counts is not None and isinstance(texts, pd.DataFrame):
        if texts.empty:
            return min(LENGTH_BUCKETS[0], limit)
        counts = np.asarray(task.token_counts(texts, tokenizer), dtype=int)
    else:
        texts, pairs = _inputs(texts)
        if not texts:
            return min(LENGTH_BUCKETS[0], limit)
        counts = np.fromiter((len(ids) for ids in tokenizer(texts, pairs, truncation=False, verbose=False)["input_ids"]), dtype=int)
    wanted = float(np.percentile(counts, 95))
    bucket = next((b for b in LENGTH_BUCKETS if b >= wanted), LENGTH_BUCKETS[-1])
    return max(8, min(bucket, cfg.max_length_cap, limit))


def _inputs(data) -> tuple[list[str], list[str] | None]:
    """(texts, their pair texts or None) from a normalized frame or a plain list of texts."""
    if isinstance(data, pd.DataFrame):
        pairs = list(data["text_pair"].astype(str)) if "text_pair" in data.columns else None
        return list(data["text"].astype(str)), pairs
    return [str(t) for t in data], None


def encode(df: pd.DataFrame, labels: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int, source: str = "data",
           task=None, model=None) -> TensorDataset:
    """The collate step of every task: a normalized frame to (input_ids, attention_mask, label).

    Text pairs (click: profile, offer) are tokenized as the tokenizer's own pair; when
    too long, the longer text is trimmed first. Pair segments are marked by [SEP] only,
    not token types: all-MiniLM-L6-v2 was trained on single texts (token type 0), and
    one batch layout keeps the trainer, Opacus and the frozen-layer cache task-agnostic.
    Without a 'label' column (scoring new rows) the labels are -1. A task with its own
    collate step (generate: chat template, per-token labels) encodes its rows itself.
    """
    task = get_task(task) if isinstance(task, str) else task
    if task is not None and task.encode is not None:
        return task.encode(df, tokenizer, max_length, source, model_length_limit(tokenizer, model))
    index = {name: i for i, name in enumerate(labels)}
    if "label" in df.columns:
        unknown = sorted(set(df["label"].map(str)) - set(index))
        if unknown:
            raise FedLoraError(f"{source} has labels outside the federation's label set {labels}: {', '.join(unknown[:5])}")
        y = torch.tensor([index[str(v)] for v in df["label"]], dtype=torch.long)
    else:
        y = torch.full((len(df),), -1, dtype=torch.long)
    texts, pairs = _inputs(df)
    enc = tokenizer(texts, pairs, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"], y)


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of a batch (either side).

    `encode` pads every text to `max_length`; short reviews use a fraction of it, and
    the model's outputs do not depend on columns the mask hides from every row.
    """
    keep = attention_mask.bool().any(0)
    if not bool(keep.any()):
        keep[0] = True
    return input_ids[:, keep], attention_mask[:, keep]


def trim_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """`trim_padding` for a whole batch: per-token labels (generate) lose the same columns."""
    keep = attention_mask.bool().any(0)
    if not bool(keep.any()):
        keep[0] = True
    if labels.dim() == 2 and labels.shape == attention_mask.shape:
        labels = labels[:, keep]
    return input_ids[:, keep], attention_mask[:, keep], labels
