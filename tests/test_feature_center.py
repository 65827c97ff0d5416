"""Centring the probe's head at the owner's DP mean feature: the same function, the
gradients of centred features, one accounted release from the CSPRNG, and only ordinary
head weights leave the client."""

import math

import numpy as np
import pytest
import torch

from client.feature_center import centred, head_layer, mean_of, release_sum
from client.label_prior import RELEASE_RATE
from client.privacy import PrivacyLedger, history_epsilon, plan_privacy
from client.trainer import _split, train_local
from shared.data import SYNTHETIC_LABELS, client_partition, encode
from shared.errors import FedLoraError
from shared.frozen_prefix import head_inputs
from shared.lora import build_model, trainable_state


@pytest.fixture
def probe_cfg(tiny_cfg):
    return tiny_cfg.replace(head_rounds=1, rounds=2, center_noise=5.0)


def _dataset(cfg, pid=0):
    model, tok = build_model(cfg, 2)
    return model, encode(client_partition(cfg, pid), SYNTHETIC_LABELS, tok, cfg.max_length)


def test_the_release_is_noisy_from_the_csprng_and_each_row_counts_at_most_one():
    features = torch.nn.functional.normalize(torch.randn(200, 6), dim=1) + 0.5
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        draws.append(release_sum(features, noise=5.0))
    assert draws[0] != draws[1], "two releases under the same seeds must differ"
    exact = release_sum(features, noise=1e-12)
    many = np.array([release_sum(features, noise=5.0) for _ in range(300)])
    assert np.allclose(many.mean(axis=0), exact, atol=1.5) and np.allclose(many.std(axis=0), 5.0, rtol=0.2)
    # sensitivity: adding any row, however large, moves the release by at most 1 (L2)
    big = torch.full((1, 6), 100.0)
    moved = np.array(release_sum(torch.cat([features, big]), 1e-12)) - np.array(exact)
    assert np.linalg.norm(moved) <= 1.0 + 1e-9
    mu = mean_of(exact, 6)  # the mean of the (clipped) rows: a row of norm <= 1 is kept as is
    unit = torch.nn.functional.normalize(torch.randn(50, 6), dim=1)
    assert torch.allclose(mean_of(release_sum(unit, 1e-12), 6), unit.mean(0), atol=1e-6)
    assert mu is not None and mean_of(exact, 7) is None and mean_of([0.0] * 6 + [0.5], 6) is None


def test_centring_keeps_the_function_and_gives_the_centred_gradient(probe_cfg):
    model, ds = _dataset(probe_cfg)
    head = head_layer(model)
    assert head is not None and head.out_features == 2
    ids, mask, labels = (t[:8] for t in ds.tensors)
    model.eval()
    before = model(ids, attention_mask=mask).logits
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
    x = head_inputs(model, head, ds)[:8]
    mu = torch.randn(head.in_features)
    with centred(head, mu):
        inside = model(ids, attention_mask=mask).logits
        model.zero_grad()
        torch.nn.functional.cross_entropy(inside, labels).backward()
        p = torch.softmax(inside.detach(), 1) - torch.nn.functional.one_hot(labels, 2)
        assert torch.allclose(head.weight.grad, p.T @ (x - mu) / 8, atol=1e-5)  # x - mu, not x
    assert torch.allclose(inside, before, atol=1e-5)
    assert torch.allclose(head.weight, weight) and torch.allclose(head.bias, bias, atol=1e-6)


@pytest.mark.parametrize("lora_layers", [0, 1])  # 1: the head reads the cached frozen prefix's top
def test_a_probe_round_releases_once_trains_the_head_and_sends_ordinary_weights(probe_cfg, lora_layers):
    probe_cfg = probe_cfg.replace(lora_layers=lora_layers)
    model, ds = _dataset(probe_cfg)
    plan = plan_privacy(probe_cfg, len(ds))
    assert plan.center_noise == 5.0
    ledger = PrivacyLedger(probe_cfg.delta, probe_cfg.target_epsilon)
    assert ledger.epsilon_after(plan) > history_epsilon(
        [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round), (plan.prior_noise, 1.0, 1)],
        probe_cfg.delta)  # the release is planned in
    head = head_layer(model)
    start = {k: v.copy() for k, v in trainable_state(model).items()}
    hooks = len(head._forward_pre_hooks)
    train_local(model, ds, probe_cfg, ledger, plan, server_round=1)
    assert ledger.center_releases == 1 and len(ledger.feature_sum) == head.in_features + 1
    assert len(head._forward_pre_hooks) == hooks  # nothing left on the model
    after = trainable_state(model)
    changed = [k for k in after if not np.array_equal(after[k], start[k])]
    assert changed and all("lora_" not in k for k in changed)  # a probe round: the head moved
    # the head that leaves is the uncentred one: the model scores as the head's weights say
    x = head_inputs(model, head, ds)
    model.eval()
    ids, mask, _ = ds.tensors
    assert torch.allclose(model(ids[:4], attention_mask=mask[:4]).logits, x[:4] @ head.weight.T + head.bias, atol=1e-5)
    released = list(ledger.feature_sum)
    ledger = PrivacyLedger.from_json(ledger.to_json())
    train_local(model, ds, probe_cfg, ledger, plan, server_round=2)  # an adapter round: no release, no centring
    assert ledger.feature_sum == released and ledger.center_releases == 1
    releases = [h for h in ledger.accountant_state["history"] if h[1] == RELEASE_RATE]
    assert sorted(releases) == sorted([(probe_cfg.label_prior_noise, 1.0, 1), (5.0, 1.0, 1)])
    assert ledger.epsilon() <= probe_cfg.target_epsilon * (1 + 1e-6)


def test_a_server_asking_for_tiny_noise_gets_no_release(probe_cfg):
    """A release that alone would spend over half the budget is not made: the server's
    setting can never take the owner's epsilon."""
    model, ds = _dataset(probe_cfg)
    cfg = probe_cfg.replace(center_noise=1e-4)
    plan = plan_privacy(cfg, len(ds))
    ledger = PrivacyLedger(cfg.delta, cfg.target_epsilon)
    train_local(model, ds, cfg, ledger, plan, server_round=1)
    assert plan.center_noise == 0.0 and ledger.center_releases == 0 and ledger.feature_sum is None
    assert ledger.epsilon() <= cfg.target_epsilon * (1 + 1e-6)


def test_off_by_default_and_without_dp(tiny_cfg):
    model, ds = _dataset(tiny_cfg)
    assert plan_privacy(tiny_cfg, len(ds)).center_noise == 0.0
    assert plan_privacy(tiny_cfg.replace(center_noise=5.0, task="generate"), len(ds)).center_noise == 0.0
    with pytest.raises(FedLoraError, match="--center-noise"):
        tiny_cfg.replace(center_noise=-1.0)
    with pytest.raises(FedLoraError, match="--center-noise"):
        tiny_cfg.replace(center_noise=math.inf)


def test_a_ledger_whose_feature_release_does_not_add_up_is_refused(probe_cfg):
    model, ds = _dataset(probe_cfg)
    plan = plan_privacy(probe_cfg, len(ds))
    ledger = PrivacyLedger(probe_cfg.delta, probe_cfg.target_epsilon)
    train_local(model, ds, probe_cfg, ledger, plan, server_round=1)
    import json

    raw = json.loads(ledger.to_json())
    raw["history"] = [h for h in raw["history"] if h[0] != 5.0]  # the release's entry dropped
    with pytest.raises(FedLoraError, match="does not add up"):
        PrivacyLedger.from_json(json.dumps(raw))
    raw = json.loads(ledger.to_json())
    del raw["feature_sum"]
    with pytest.raises(FedLoraError, match="center_releases and feature_sum"):
        PrivacyLedger.from_json(json.dumps(raw))


def test_the_probe_replay_learns_a_separable_federation(tiny_cfg):
    """simulations/replay_probe.py replays the DP probe rounds on given features: on two
    well-separated classes split over two owners it ends far above chance, centred or not."""
    import json

    from simulations.replay_probe import replay

    gen = np.random.default_rng(0)
    y = gen.integers(0, 2, 400)
    x = np.eye(8)[y * 3] * 0.6 + 0.5 + 0.05 * gen.normal(size=(400, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    data = {"xtrain": x[:300].astype(np.float32), "ytrain": y[:300], "xtest": x[300:].astype(np.float32),
            "ytest": y[300:], "owner": np.array(["a"] * 150 + ["b"] * 150), "labels": np.array(["0", "1"])}
    cfg = tiny_cfg.replace(labels=json.dumps(["0", "1"]), rounds=4, batch_size=32)
    for variant in (cfg, cfg.replace(center_noise=5.0)):
        f1 = replay(variant, data, rounds=3, seed=0)
        assert len(f1) == 3 and f1[-1] > 0.9


def test_the_pooled_replay_is_one_owner_with_less_noise(tiny_cfg):
    """`--pooled` replays one owner holding every row: on an owner 10x larger the same
    budget buys a smaller noise multiplier, so the first round's head is closer to the
    noise-free one than the federation's."""
    import json

    from simulations.replay_probe import replay

    gen = np.random.default_rng(1)
    y = gen.integers(0, 2, 2200)
    x = np.eye(8)[y * 3] * 0.3 + 0.5 + 0.2 * gen.normal(size=(2200, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    data = {"xtrain": x[:2000].astype(np.float32), "ytrain": y[:2000], "xtest": x[2000:].astype(np.float32),
            "ytest": y[2000:], "owner": np.repeat([str(i) for i in range(10)], 200), "labels": np.array(["0", "1"])}
    cfg = tiny_cfg.replace(labels=json.dumps(["0", "1"]), rounds=8, batch_size=32, target_epsilon=1.0)
    pooled = np.mean([replay(cfg, data, rounds=2, seed=s, pooled=True)[-1] for s in range(3)])
    federated = np.mean([replay(cfg, data, rounds=2, seed=s)[-1] for s in range(3)])
    assert pooled > federated
