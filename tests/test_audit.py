"""The one-run audit's bound (Steinke, Nasr, Jagielski 2023) and a smoke run of the audit."""

import math

import numpy as np
import pytest

from simulations.audit import audit_scores, epsilon_lower_bound, p_value, run_once


def test_all_correct_guesses_give_the_binomial_bound_and_chance_gives_zero():
    # r correct out of r at 95%: q^r = 0.05, eps = log(q / (1 - q))
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(1000, 100, 100, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), rel=1e-4)
    assert epsilon_lower_bound(1000, 100, 50, 0.0, 0.05) == 0.0
    # delta only weakens the bound, and p-values fall as eps rises
    assert epsilon_lower_bound(1000, 100, 90, 1e-5, 0.05) <= epsilon_lower_bound(1000, 100, 90, 0.0, 0.05)
    assert p_value(1000, 100, 90, 2.0, 0.0) > p_value(1000, 100, 90, 1.0, 0.0)


def test_scores_that_separate_members_give_a_positive_bound():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    assert audit_scores(included + rng.normal(0, 0.3, 1000), included, 0.0)["epsilon_lb"] > 1.0
    assert audit_scores(rng.normal(0, 1, 1000), included, 0.0)["epsilon_lb"] < 0.5


def test_audit_runs_through_the_training_path(tiny_cfg):
    res = run_once(tiny_cfg.replace(rounds=1, brands=1, num_clients=1), m=32, seed=0, owners=1)
    assert res.canaries == 32 and 0 < res.included < 32
    assert 0 < res.spent_epsilon <= tiny_cfg.target_epsilon
    assert {"epsilon_lb", "auc", "guesses", "correct"} <= set(res.final) and res.rounds["guesses"] > 0


def test_white_box_gradients_match_one_example_backward(tiny_cfg):
    import torch

    from shared.data import SYNTHETIC_LABELS, encode, trim_padding
    from shared.lora import build_model, trainable_state
    from simulations.audit import _unit_gradients, make_canaries

    model, tokenizer = build_model(tiny_cfg, len(SYNTHETIC_LABELS))
    ds = encode(make_canaries(5, np.random.default_rng(0), tokenizer), SYNTHETIC_LABELS, tokenizer, 32)
    keys = sorted(trainable_state(model))
    grads = _unit_gradients(model, ds, keys, batch=3)
    named = dict(model.named_parameters())
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in named.values() if p.requires_grad)
    assert not any(hasattr(m, "_forward_hooks") and m._forward_hooks for m in model.modules()), "hooks left behind"
    for i in range(len(ds)):
        ids, mask, y = ds[i:i + 1]
        ids, mask = trim_padding(ids, mask)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y).backward()
        g = torch.cat([named[k].grad.reshape(-1) for k in keys]).double().numpy()
        assert np.allclose(grads[i], g / np.linalg.norm(g), atol=1e-5)
