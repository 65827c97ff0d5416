"""simulations/bench_real.py's linear probe is the bar a run must clear: it must read the
base model, whatever adapters an earlier run in the same process left in the cached model."""

import numpy as np
import torch

from shared.data import load_federation
from shared.lora import cached_model
from simulations.bench_real import probe_features


def test_the_probe_ignores_adapters_an_earlier_run_trained(tiny_cfg):
    cfg = tiny_cfg.replace(lora="plain")
    before = probe_features(cfg)
    model, _ = cached_model(cfg, len(load_federation(cfg).labels))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora
    with torch.no_grad():
        for p in lora:  # as a local-only baseline or the server's evaluation leaves them
            p.add_(torch.randn_like(p))
    after = probe_features(cfg)
    for x, y in zip(before[:4], after[:4]):
        np.testing.assert_allclose(x, y, atol=1e-5)
