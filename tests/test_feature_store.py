"""The frozen-prefix and pooled-feature caches live on the owner's disk: a new process (a
restarted agent, a Ray worker serving another owner) reads what an
earlier one computed, and only where the frozen weights and the data are the same."""

import os
import stat

import pytest
import torch
from torch.utils.data import TensorDataset

import shared.frozen_prefix as fp
from shared.data import SYNTHETIC_LABELS, client_partition, encode
from shared.frozen_prefix import training_view
from shared.lora import build_model


@pytest.fixture
def layered(tiny_cfg):
    cfg = tiny_cfg.replace(lora_layers=1)
    model, tok = build_model(cfg, 2)
    return cfg, model, encode(client_partition(cfg, 0), SYNTHETIC_LABELS, tok, cfg.max_length)


def _counting(monkeypatch):
    calls = []
    real = fp._features
    monkeypatch.setattr(fp, "_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_new_process_reads_the_stored_prefix_instead_of_recomputing(layered, monkeypatch):
    cfg, model, data = layered
    calls = _counting(monkeypatch)
    _, first = training_view(model, data, 1, "key")
    fp._CACHE.clear()  # what a fresh process starts with
    _, second = training_view(model, data, 1, "key")
    assert len(calls) == 1
    for a, b in zip(first.tensors, second.tensors):
        assert torch.equal(a, b)
    [stored] = list(fp._store().glob("*.pt"))
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600  # derived from the owner's rows: the owner's eyes only


def test_a_damaged_file_is_recomputed(layered, monkeypatch):
    cfg, model, data = layered
    calls = _counting(monkeypatch)
    _, first = training_view(model, data, 1, "key")
    [stored] = list(fp._store().glob("*.pt"))
    cut = stored.with_suffix(".tmp")
    cut.write_bytes(stored.read_bytes()[:100])  # a foreign, cut-short file in its place (files are
    os.replace(cut, stored)  # only ever replaced, never rewritten under a live memory map)
    fp._CACHE.clear()
    _, again = training_view(model, data, 1, "key")
    assert len(calls) == 2 and torch.equal(first.tensors[0], again.tensors[0])


def test_other_base_weights_never_read_an_older_entry(layered, monkeypatch):
    cfg, model, data = layered
    calls = _counting(monkeypatch)
    training_view(model, data, 1, "key")
    other, _ = build_model(cfg.replace(seed=1), 2)  # same key string, different frozen weights
    fp._CACHE.clear()
    _, theirs = training_view(other, data, 1, "key")
    assert len(calls) == 2 and len(list(fp._store().glob("*.pt"))) == 2
    fp._CACHE.clear()
    _, mine = training_view(model, data, 1, "key")
    assert len(calls) == 2 and not torch.equal(mine.tensors[0], theirs.tensors[0])


def test_the_store_keeps_to_its_budget_dropping_the_least_recently_used(monkeypatch, tiny_cfg):
    model, _ = build_model(tiny_cfg, 2)
    entry = lambda: TensorDataset(torch.zeros(256, 64))  # 64 KB each
    monkeypatch.setattr(fp, "DISK_BYTES", 3 * 64 * 1024 + 8192)
    for i in range(3):
        fp._cached(f"k{i}", model, entry)
        for age, path in enumerate(sorted(fp._store().glob("*.pt"), key=lambda q: q.stat().st_mtime_ns)):
            os.utime(path, (1e9 + age, 1e9 + age))  # distinct times, oldest first
    fp._CACHE.clear()
    fp._cached("k0", model, lambda: pytest.fail("k0 is stored"))  # k0 becomes the most recently used
    fp._cached("k3", model, entry)  # over budget: the least recently used (k1) goes
    fp._CACHE.clear()
    assert len(list(fp._store().glob("*.pt"))) == 3
    for key in ("k0", "k2", "k3"):
        fp._cached(key, model, lambda: pytest.fail(f"{key} must still be stored"))
    recomputed = []
    fp._cached("k1", model, lambda: recomputed.append(1) or entry())
    assert recomputed == [1]
