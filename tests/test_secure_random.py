"""Defect 1: DP noise and Poisson batches must not be predictable from the server's seed."""

import numpy as np
import pytest
import torch

from client.privacy import PrivacyLedger, plan_privacy
from client.secure_random import ChaChaRNG, secure_poisson_loader
from client.trainer import train_local
from shared.data import SYNTHETIC_LABELS, client_partition, encode
from shared.lora import build_model, trainable_state


def _run(cfg):
    model, tok = build_model(cfg, 2)
    ds = encode(client_partition(cfg, 0), SYNTHETIC_LABELS, tok, cfg.max_length)
    plan = plan_privacy(cfg, len(ds))
    train_local(model, ds, cfg, PrivacyLedger(cfg.delta, cfg.target_epsilon), plan, server_round=1)
    return trainable_state(model)


def test_two_dp_runs_with_the_same_seed_draw_different_noise(tiny_cfg):
    a, b = _run(tiny_cfg), _run(tiny_cfg)
    assert set(a) == set(b)
    assert all(not np.array_equal(a[k], b[k]) for k in a), "same seed, same adapter: the noise is predictable"


def test_non_private_runs_stay_reproducible_from_the_seed(tiny_cfg):
    cfg = tiny_cfg.replace(dp=False)
    a, b = _run_nodp(cfg), _run_nodp(cfg)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _run_nodp(cfg):
    model, tok = build_model(cfg, 2)
    ds = encode(client_partition(cfg, 0), SYNTHETIC_LABELS, tok, cfg.max_length)
    train_local(model, ds, cfg, server_round=1)
    return trainable_state(model)


def test_noise_is_gaussian_with_the_planned_std_and_ignores_torch_seed():
    ref = torch.zeros(200_000)
    torch.manual_seed(0)
    x = ChaChaRNG().gaussian_noise(0.7, ref)
    torch.manual_seed(0)
    y = ChaChaRNG().gaussian_noise(0.7, ref)
    assert not torch.equal(x, y)
    assert x.dtype == torch.float32 and x.shape == ref.shape
    assert abs(float(x.mean())) < 0.01 and float(x.std()) == pytest.approx(0.7, rel=0.01)
    z = (x / 0.7).double().numpy()
    assert np.mean(z ** 4) == pytest.approx(3.0, rel=0.05)  # Gaussian kurtosis
    # the same key replays the same stream: the key alone is the secret
    key = bytes(range(32))
    assert torch.equal(ChaChaRNG(key).gaussian_noise(1.0, ref[:10]), ChaChaRNG(key).gaussian_noise(1.0, ref[:10]))


def test_poisson_batches_have_the_planned_rate_and_differ_between_streams():
    ds = torch.utils.data.TensorDataset(torch.arange(1000))
    loader = torch.utils.data.DataLoader(ds, batch_size=100)
    a = [b[0].tolist() for b in secure_poisson_loader(loader, ChaChaRNG())]
    b = [b[0].tolist() for b in secure_poisson_loader(loader, ChaChaRNG())]
    assert len(a) == len(b) == 10
    assert a != b
    sizes = [len(x) for x in a]
    assert 700 < sum(sizes) < 1300


def test_opacus_secure_rng_warning_is_replaced_by_one_log_line(caplog, recwarn):
    import client.secure_random as sr

    sr._noticed = False
    with caplog.at_level("WARNING", logger="fedlora.client"):
        sr.privacy_engine()
        sr.privacy_engine()
    lines = [r.getMessage() for r in caplog.records if "secure_mode is off" in r.getMessage()]
    assert len(lines) == 1 and "ChaCha20" in lines[0] and "os.urandom" in lines[0]
    assert not [w for w in recwarn if "Secure RNG turned off" in str(w.message)]
