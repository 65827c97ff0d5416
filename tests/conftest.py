import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from shared.config import FedConfig  # noqa: E402


@pytest.fixture
def tiny_cfg(tmp_path) -> FedConfig:
    """A 3-brand synthetic federation on a random-weight 2-layer BERT."""
    return FedConfig(model="tiny-bert", brands=3, num_clients=3, examples_per_brand=64, test_size=60,
                     rounds=2, batch_size=16, lr=5e-3, max_length=32, output=str(tmp_path / "run"),
                     head_rounds=0)  # the adapter trains from round 1 (LP-FT has its own test)


@pytest.fixture(autouse=True)
def _private_feature_store(tmp_path, monkeypatch):
    """Each test computes its cached features afresh (tests count encoder passes) instead of
    reading the disk store an earlier test or run left in $FEDLORA_CACHE/features."""
    import shared.frozen_prefix as frozen_prefix

    monkeypatch.setattr(frozen_prefix, "_store", lambda: tmp_path / "feature-store")
    frozen_prefix._CACHE.clear()
