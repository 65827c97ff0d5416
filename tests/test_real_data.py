"""Real owners' data: partition columns with holes and tiny groups, token length from the data,
per-class metrics, and the frozen-prefix path that must give the full model's results."""

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from client.privacy import PrivacyLedger, plan_privacy
from client.trainer import train_local
from shared.config import FedConfig
from shared.data import choose_max_length, client_partition, encode, num_partitions, partitioning
from shared.evaluation import evaluate, scores
from shared.frozen_prefix import split_layer, training_view
from shared.lora import build_model, load_trainable_state, trainable_state
from shared.models import minilm_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def _owners_file(tmp_path, sizes: dict, missing: int = 0) -> str:
    rng = np.random.default_rng(0)
    rows = [{"text": f"review {i} of store {s}: {'great' if i % 2 else 'awful'} service", "label": "pos" if i % 2 else "neg",
             "store": s} for s, n in sizes.items() for i in range(n)]
    rows += [{"text": f"orphan review {i}", "label": "neg", "store": None} for i in range(missing)]
    path = tmp_path / "owners.csv"
    pd.DataFrame(rows).sample(frac=1.0, random_state=int(rng.integers(100))).to_csv(path, index=False)
    return str(path)


def test_partition_column_with_missing_values_and_tiny_groups(tmp_path):
    path = _owners_file(tmp_path, {"a": 60, "b": 45, "c": 5, "d": 3}, missing=7)
    cfg = FedConfig(model="tiny-bert", data=path, test_data=path, partition_by="store")
    parts = partitioning(cfg)
    assert sorted(parts.names) == ["a", "b"] and num_partitions(cfg) == 2
    assert any("7 rows without a 'store' value" in n for n in parts.notes)
    assert any("2 of 4 owners with fewer than 20 rows (8 rows)" in n for n in parts.notes)
    sizes = sorted(len(client_partition(cfg, pid)) for pid in range(2))
    assert sizes == [45, 60]
    assert sorted(parts.sizes) == sizes


def test_partition_column_entirely_empty_is_one_line_error(tmp_path):
    path = tmp_path / "empty_owner.csv"
    pd.DataFrame({"text": ["a b"] * 30, "label": ["x", "y"] * 15, "store": [None] * 30}).to_csv(path, index=False)
    from shared.errors import FedLoraError

    with pytest.raises(FedLoraError, match="no values to partition by"):
        partitioning(FedConfig(data=str(path), partition_by="store"))


def test_length_from_the_data_is_a_bucketed_high_percentile(tokenizer):
    cfg = FedConfig()
    short = ["great product"] * 95 + ["word " * 200] * 5
    assert choose_max_length(short, tokenizer, cfg) == 32  # the long 5% do not set the length
    medium = ["word " * 50] * 100
    assert choose_max_length(medium, tokenizer, cfg) == 64
    long = ["word " * 1000] * 100
    assert choose_max_length(long, tokenizer, cfg) == 256  # --max-length-cap
    assert choose_max_length(long, tokenizer, cfg.replace(max_length_cap=128)) == 128
    assert choose_max_length(short, tokenizer, cfg.replace(max_length=48)) == 48  # explicit override
    assert choose_max_length(long, tokenizer, cfg.replace(max_length=4096)) == 512  # the model's limit


def test_scores_report_per_class_recall_and_majority():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 0, 0, 0, 0, 0])
    out = scores(y_pred, y_true, 3)
    assert out["accuracy"] == 0.5 and out["majority_accuracy"] == 0.5
    assert out["recall"] == [1.0, 0.0, 0.0]
    assert out["macro_f1"] == pytest.approx((2 * 0.5 / 1.5) / 3)


def _tiny(lora_layers):
    cfg = FedConfig(model="tiny-bert", lora_layers=lora_layers, batch_size=8, brands=2, examples_per_brand=32,
                    head_rounds=0)
    model, tok = build_model(cfg, 2)
    data = encode(client_partition(cfg.replace(partition_by="brand"), 0), ["negative", "positive"], tok, 32)
    return cfg, model, data


def test_frozen_prefix_gives_the_full_models_logits():
    cfg, model, data = _tiny(lora_layers=1)
    assert split_layer(model, 1) == 1
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    full = evaluate(model, data, 2)
    top, features = training_view(model, data, 1, "test")
    cached = evaluate(top, features, 2)
    assert cached["loss"] == pytest.approx(full["loss"], abs=1e-3)
    assert cached["accuracy"] == full["accuracy"]


def test_dp_training_on_the_frozen_prefix_moves_the_full_models_adapter():
    """The top module shares the model's own tensors: a DP step there is a step of the model (opacus#820)."""
    cfg, model, data = _tiny(lora_layers=1)
    before = trainable_state(model)
    ledger = PrivacyLedger(cfg.delta, cfg.target_epsilon)
    train_local(model, data, cfg, ledger, plan_privacy(cfg, len(data)), server_round=1)
    after = trainable_state(model)
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    assert any("lora_B" in k for k in moved) and any("classifier" in k for k in moved)
    assert all(".layer.1." in k for k in moved if "lora" in k)  # only the top layer carries adapters
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    assert hooks == 0
    load_trainable_state(model, before)


def _fresh_partitioning(monkeypatch, tmp_path):
    """A process that has not partitioned yet (the lru caches are per process), with its own cache folder."""
    from shared import data

    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    _clear(data)
    return data


def _clear(data):
    for cached in (data._partitioning, data._load):
        cached.cache_clear()


def test_workers_read_partitions_memory_mapped_without_loading_the_federation(monkeypatch, tmp_path):
    """The first process writes the rows to the cache; a later one (a simulation worker)
    cuts the same partitions from the memory-mapped file without ever building the
    federation's in-memory copy, and the partitions are row for row the first one's."""
    data = _fresh_partitioning(monkeypatch, tmp_path)
    path = _owners_file(tmp_path, {"a": 60, "b": 45, "c": 30}, missing=4)
    cfg = FedConfig(model="tiny-bert", data=path, test_data=path, partition_by="store")
    first = [client_partition(cfg, pid) for pid in range(3)]
    notes = partitioning(cfg).notes
    assert partitioning(cfg).partitioner.dataset.cache_files  # served from the file, not from memory

    _clear(data)
    monkeypatch.setattr(data, "_rows", lambda key: pytest.fail("a worker loaded the whole federation"))
    again = [client_partition(cfg, pid) for pid in range(3)]
    for a, b in zip(first, again):
        pd.testing.assert_frame_equal(a, b)
    assert partitioning(cfg).notes == notes and sorted(partitioning(cfg).sizes) == [30, 45, 60]


def test_a_changed_owner_file_or_a_torn_cache_is_partitioned_afresh(monkeypatch, tmp_path):
    """The cache is keyed by the data file's size and modification time: new rows at the same
    path are never served from the old file; a torn cache entry is rebuilt, not trusted."""
    import os
    import shutil

    data = _fresh_partitioning(monkeypatch, tmp_path)
    path = _owners_file(tmp_path, {"a": 40, "b": 30})
    cfg = FedConfig(model="tiny-bert", data=path, test_data=path, partition_by="store")
    assert sorted(partitioning(cfg).sizes) == [30, 40]

    frame = pd.read_csv(path)
    pd.concat([frame, frame[frame["store"] == "a"]]).to_csv(path, index=False)
    os.utime(path, ns=(1, 2))  # even with an older modification time: the size differs
    _clear(data)
    assert sorted(partitioning(cfg).sizes) == [30, 80]

    for entry in (tmp_path / "cache" / "partitions").iterdir():
        shutil.rmtree(entry / "rows")  # torn: the notes remain, the rows are gone
    _clear(data)
    assert sorted(partitioning(cfg).sizes) == [30, 80]
    assert partitioning(cfg).partitioner.dataset.cache_files  # and the cache entry is whole again


def test_the_server_with_its_label_set_filled_in_reuses_the_rows_and_partitions(monkeypatch, tmp_path):
    """The server runs with --labels set to the label set it derived. That names the same
    rows: it must not load the federation a second time (a second 125 MB copy at 500,000
    rows) nor cut a second set of partitions, and an explicit label set that names a label
    only the test file has is still accepted."""
    import json

    data = _fresh_partitioning(monkeypatch, tmp_path)
    loads = []
    rows = data._rows
    monkeypatch.setattr(data, "_rows", lambda key: loads.append(key) or rows(key))
    path = _owners_file(tmp_path, {"a": 40, "b": 30})
    cfg = FedConfig(model="tiny-bert", data=path, test_data=path, partition_by="store")
    fed = data.load_federation(cfg)
    assert "train" not in vars(fed)  # the run-long object keeps the test rows and labels only
    named = cfg.replace(labels=json.dumps(fed.labels))
    assert data.load_federation(named).labels == fed.labels
    loads.clear()
    assert partitioning(named) is partitioning(cfg) and num_partitions(named) == 2
    assert len(loads) == 1  # the rows read once, to write the partitions' cache file

    test_only = tmp_path / "test.csv"
    frame = pd.read_csv(path)
    pd.concat([frame, frame.head(1).assign(label="meh")]).to_csv(test_only, index=False)
    wider = FedConfig(model="tiny-bert", data=path, test_data=str(test_only), partition_by="store", labels=json.dumps(["neg", "pos", "meh"]))
    assert data.load_federation(wider).labels == ["neg", "pos", "meh"] and num_partitions(wider) == 2
