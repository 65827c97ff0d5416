"""The logit-adjusted loss and its label prior: released under DP once per owner, accounted,
drawn from the client's CSPRNG, and used exactly as the loss says."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.label_prior import RELEASE_RATE, log_prior, release_counts
from client.privacy import PrivacyLedger, history_epsilon, plan_privacy
from client.trainer import logit_offset, train_local
from shared.data import SYNTHETIC_LABELS, client_partition, encode
from shared.errors import FedLoraError
from shared.lora import build_model
from shared.tasks import get_task


def _dataset(cfg, pid=0):
    model, tok = build_model(cfg, 2)
    return model, encode(client_partition(cfg, pid), SYNTHETIC_LABELS, tok, cfg.max_length)


def test_release_noise_comes_from_the_csprng_not_from_any_seed():
    labels = torch.tensor([0] * 300 + [1] * 100)
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        draws.append(release_counts(labels, 2, noise=10.0))
    assert draws[0] != draws[1], "two releases under the same seeds must differ"
    many = np.array([release_counts(labels, 2, noise=10.0) for _ in range(400)])
    assert np.allclose(many.mean(axis=0), [300, 100], atol=2.0)  # unbiased
    assert np.allclose(many.std(axis=0), 10.0, rtol=0.15)  # at the accounted noise


def test_a_small_owners_noisy_prior_is_near_uniform():
    """Smoothing by the noise scale: 20 rows at noise 10 shift the logits far less than the
    exact prior would; hundreds of rows keep their skew."""
    small, large = log_prior([18.0, 2.0], smoothing=10.0), log_prior([1800.0, 200.0], smoothing=10.0)
    assert float(small[0] - small[1]) < 1.0 < math.log(9) - 0.1 < float(large[0] - large[1])  # exact: log 9
    assert torch.allclose(log_prior([-5.0, -3.0], smoothing=10.0).exp(), torch.tensor([0.5, 0.5]))


def test_the_loss_adds_the_offset_to_the_logits(tiny_cfg):
    model, ds = _dataset(tiny_cfg)
    ids, mask, labels = (t[:8] for t in ds.tensors)
    task = get_task(tiny_cfg)
    offset = torch.tensor([0.7, -1.3])
    model.eval()
    logits = model(ids, attention_mask=mask).logits
    assert torch.allclose(task.loss(model, ids, mask, labels, offset), F.cross_entropy(logits + offset, labels))
    assert torch.allclose(task.loss(model, ids, mask, labels, torch.zeros(2)), task.loss(model, ids, mask, labels))


def test_click_keeps_plain_cross_entropy_and_zero_turns_it_off(tiny_cfg):
    """Click rates are the product there: their probabilities must stay calibrated."""
    model, ds = _dataset(tiny_cfg)
    ledger = PrivacyLedger(tiny_cfg.delta, tiny_cfg.target_epsilon)
    for cfg in (tiny_cfg.replace(task="click"), tiny_cfg.replace(logit_adjust=0.0)):
        plan = plan_privacy(cfg, len(ds))
        assert plan.prior_noise == 0.0 and logit_offset(model, ds, cfg, ledger, plan) is None
    assert ledger.label_releases == 0 and not ledger.accountant_state["history"]


def test_a_budget_too_small_for_the_release_trains_without_it(tiny_cfg):
    """The release alone would spend over half of epsilon 0.5: the owner trains with plain
    cross-entropy and releases nothing, rather than being refused."""
    cfg = tiny_cfg.replace(target_epsilon=0.5)
    model, ds = _dataset(cfg)
    plan = plan_privacy(cfg, len(ds))
    ledger = PrivacyLedger(cfg.delta, cfg.target_epsilon)
    assert plan.prior_noise == 0.0 and logit_offset(model, ds, cfg, ledger, plan) is None
    assert ledger.label_releases == 0 and plan_privacy(tiny_cfg, len(ds)).prior_noise == 10.0


def test_under_dp_the_prior_is_released_once_and_every_release_is_accounted(tiny_cfg):
    model, ds = _dataset(tiny_cfg)
    plan = plan_privacy(tiny_cfg, len(ds))
    ledger = PrivacyLedger(tiny_cfg.delta, tiny_cfg.target_epsilon)
    assert ledger.epsilon_after(plan) > history_epsilon(
        [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)], tiny_cfg.delta)  # planned in
    train_local(model, ds, tiny_cfg, ledger, plan, server_round=1)
    counts = ledger.label_counts
    assert counts is not None and len(counts) == 2
    exact = torch.bincount(ds.tensors[-1], minlength=2).tolist()
    assert counts != exact  # noisy, not the owner's true counts
    ledger = PrivacyLedger.from_json(ledger.to_json())  # carried to the next round
    train_local(model, ds, tiny_cfg, ledger, plan, server_round=2)
    assert ledger.label_counts == counts and ledger.label_releases == 1  # reused, not drawn again
    releases = [h for h in ledger.accountant_state["history"] if h[1] == RELEASE_RATE]
    assert releases == [(tiny_cfg.label_prior_noise, 1.0, 1)]
    without = [h for h in ledger.accountant_state["history"] if h[1] != RELEASE_RATE]
    assert ledger.epsilon() > history_epsilon(without, tiny_cfg.delta)
    assert ledger.epsilon() <= tiny_cfg.target_epsilon * (1 + 1e-6)  # the plan made room for it


def test_a_ledger_whose_releases_do_not_add_up_is_refused(tiny_cfg):
    model, ds = _dataset(tiny_cfg)
    ledger = PrivacyLedger(tiny_cfg.delta, tiny_cfg.target_epsilon)
    train_local(model, ds, tiny_cfg, ledger, plan_privacy(tiny_cfg, len(ds)), server_round=1)
    good = ledger.to_json()
    PrivacyLedger.from_json(good)
    import json

    raw = json.loads(good)
    hidden = dict(raw, history=[h for h in raw["history"] if h[1] != 1.0])  # a release left out of the history
    counts_only = {k: v for k, v in raw.items() if k != "label_releases"}
    for bad in (hidden, counts_only, dict(raw, label_counts=["x", 1])):
        with pytest.raises(FedLoraError):
            PrivacyLedger.from_json(json.dumps(bad))


def test_counts_for_another_label_set_are_not_released_again(tiny_cfg):
    """A ledger kept from a run with three labels: no second, unplanned release; no adjustment."""
    model, ds = _dataset(tiny_cfg)
    ledger = PrivacyLedger(tiny_cfg.delta, tiny_cfg.target_epsilon)
    ledger.label_prior(torch.tensor([0, 1, 2]), 3, 10.0)
    history = list(ledger.accountant_state["history"])
    assert logit_offset(model, ds, tiny_cfg, ledger, plan_privacy(tiny_cfg, len(ds))) is None
    assert ledger.accountant_state["history"] == history and ledger.label_releases == 1
