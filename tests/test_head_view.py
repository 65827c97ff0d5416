"""Probe rounds train the head on pooled features computed once: the model's own head and
function, one encoder pass per round (the mean-feature release included), a DP step that
moves the model's head (opacus#820), and a fresh pass once the adapters have moved."""

import numpy as np
import pytest
import torch

from client.privacy import PrivacyLedger, plan_privacy
from client.trainer import _split, train_local
from shared.data import SYNTHETIC_LABELS, client_partition, encode
from shared.evaluation import evaluate
from shared.frozen_prefix import HeadTop, head_view, training_view
from shared.lora import build_model, trainable_state


@pytest.fixture
def probe_cfg(tiny_cfg):
    return tiny_cfg.replace(head_rounds=1, rounds=2, cached_probe=True)


def _model_and_data(cfg):
    model, tok = build_model(cfg, 2)
    return model, encode(client_partition(cfg, 0), SYNTHETIC_LABELS, tok, cfg.max_length)


def _only_head_trains(model):
    adapter, _ = _split(model)
    for p in adapter:
        p.requires_grad_(False)
    return adapter


def _encoder_calls(model):
    calls = []
    embeddings = next(m for n, m in model.named_modules() if n.endswith("bert.embeddings"))
    embeddings.register_forward_hook(lambda module, args, out: calls.append(len(out)))
    return calls


def test_the_head_view_gives_the_full_models_logits(probe_cfg):
    model, data = _model_and_data(probe_cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)  # adapters and head away from their start
    full = evaluate(model, data, 2)
    _only_head_trains(model)
    view = head_view(model, data, f"logits-{id(model)}")
    assert view is not None and isinstance(view[0], HeadTop)
    cached = evaluate(*view, 2)
    assert cached["loss"] == pytest.approx(full["loss"], abs=1e-4)
    assert cached["accuracy"] == full["accuracy"]


def test_only_a_probe_round_takes_the_view(probe_cfg):
    model, data = _model_and_data(probe_cfg)
    assert training_view(model, data, 0, "k", head_only=True)[0] is model  # adapters still trainable
    _only_head_trains(model)
    assert isinstance(training_view(model, data, 0, "k", head_only=True)[0], HeadTop)
    assert training_view(model, data, 0, "k", head_only=False)[0] is model


def test_a_dp_probe_round_moves_the_models_head_with_one_encoder_pass(probe_cfg):
    cfg = probe_cfg.replace(center_noise=5.0, local_epochs=3)
    model, data = _model_and_data(cfg)
    calls = _encoder_calls(model)
    before = trainable_state(model)
    ledger = PrivacyLedger(cfg.delta, cfg.target_epsilon)
    train_local(model, data, cfg, ledger, plan_privacy(cfg, len(data)), server_round=1)
    moved = [k for k, v in trainable_state(model).items() if not np.array_equal(before[k], v)]
    assert moved and all("classifier" in k for k in moved)
    assert sum(calls) == len(data), "three epochs and the mean-feature release share one encoder pass"
    assert ledger.center_releases == 1
    calls.clear()
    train_local(model, data, cfg.replace(cached_probe=False), PrivacyLedger(cfg.delta, cfg.target_epsilon),
                plan_privacy(cfg, len(data)), server_round=1)
    assert sum(calls) > 3 * len(data), "off: every epoch runs the whole model"
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    assert hooks <= 2  # the mask capture and the counter above: no Opacus hook left behind


def test_moved_adapters_get_a_fresh_pass(probe_cfg):
    """The cache is keyed by the adapter weights, so a resumed or adapted model is never
    probed on the features of the model it was."""
    model, data = _model_and_data(probe_cfg)
    calls = _encoder_calls(model)
    adapter = _only_head_trains(model)
    head_view(model, data, "moved")
    head_view(model, data, "moved")
    assert sum(calls) == len(data)
    with torch.no_grad():
        adapter[0].add_(0.1)
    head_view(model, data, "moved")
    assert sum(calls) == 2 * len(data)
