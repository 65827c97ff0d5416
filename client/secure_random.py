"""DP randomness the server cannot predict: Gaussian noise and Poisson sampling from ChaCha20.

Opacus's ``secure_mode`` needs torchcsprng, which has no build for this torch. Without
it Opacus draws noise and Poisson batches from torch's Mersenne Twister, seeded (before
this module) from the run seed, i.e. from the server's config: the server could replay
every batch and every noise draw and subtract the noise. Here each private round keys a
fresh ChaCha20 stream with 256 bits from ``os.urandom``; nothing about the key leaves the
process or depends on ``cfg.seed``.

- Poisson sampling: each example joins each batch iff a 53-bit uniform from the stream is
  below the sample rate (the same rule as Opacus's ``UniformWithReplacementSampler``).
- Noise: Box-Muller normals in float64 from the stream; like Opacus's secure mode, each
  coordinate is the sum of 4 normals divided by 2 (same variance), which hides the gaps
  of a single sampler's floating-point output (Mironov 2012; Jin et al. 2022).

``cfg.seed`` keeps its meaning for data splits, the shared FFA-LoRA A matrices and head
initialisation, and the whole of a non-private run (which stays bit-reproducible).
"""

from __future__ import annotations

import logging
import os
import secrets
import types
import warnings

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.data_loader import DPDataLoader
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

log = logging.getLogger("fedlora.client")

_NOTICE = ("Opacus secure_mode is off (torchcsprng is not available for this torch); fedlora draws DP noise "
           "and Poisson batches from ChaCha20 keyed with 256 bits from os.urandom, fresh every round "
           "(client/secure_random.py)")
_noticed = False


def secret_seed() -> int:
    """A 63-bit seed nobody else knows (for torch's own RNG under DP: dropout and the like)."""
    return secrets.randbits(63)


class ChaChaRNG:
    """A ChaCha20 keystream read as uniforms and normals; the key comes from os.urandom."""

    def __init__(self, key: bytes | None = None) -> None:
        key = key if key is not None else os.urandom(32)
        if len(key) != 32:
            raise ValueError("ChaCha20 needs a 256-bit key")
        self._enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def _words(self, n: int) -> np.ndarray:
        return np.frombuffer(self._enc.update(bytes(8 * n)), dtype="<u8")

    def uniform(self, n: int) -> np.ndarray:
        """n floats uniform on [0, 1) with 53 random bits each."""
        return (self._words(n) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53

    def normal(self, n: int) -> np.ndarray:
        """n standard normals (float64), Box-Muller over the keystream."""
        half = (n + 1) // 2
        u1 = ((self._words(half) >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53  # (0, 1]
        u2 = self.uniform(half)
        r = np.sqrt(-2.0 * np.log(u1))
        return np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]

    def gaussian_noise(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        """Noise shaped like `reference`: (z1 + z2 + z3 + z4) / 2 * std, as in Opacus's secure mode."""
        n = reference.numel()
        if std == 0 or n == 0:
            return torch.zeros_like(reference)
        z = self.normal(4 * n).reshape(4, n).sum(axis=0) * (0.5 * std)
        return torch.from_numpy(z).to(device=reference.device, dtype=reference.dtype).view_as(reference)


class SecurePoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson batch sampler with the inclusion coins drawn from ChaCha20."""

    def __init__(self, *, num_samples: int, sample_rate: float, rng: ChaChaRNG, steps: int | None = None) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self.rng = rng

    def __iter__(self):
        for _ in range(self.steps):
            yield np.flatnonzero(self.rng.uniform(self.num_samples) < self.sample_rate).tolist()


def secure_poisson_loader(loader: DataLoader, rng: ChaChaRNG) -> DataLoader:
    """The DataLoader Opacus's Poisson sampling would build (same sample rate, same number
    of batches, same empty-batch collate), sampling from `rng`."""
    reference = DPDataLoader.from_data_loader(loader)
    sampler = SecurePoissonSampler(num_samples=len(loader.dataset), sample_rate=reference.sample_rate,
                                   steps=len(reference), rng=rng)
    return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=reference.collate_fn)


def _secure_add_noise(self, rng: ChaChaRNG) -> None:
    """DPOptimizer.add_noise (Opacus 1.6) with the noise drawn from `rng`."""
    for p in self.params:
        _check_processed_flag(p.summed_grad)
        noise = rng.gaussian_noise(self.noise_multiplier * self.max_grad_norm, p.summed_grad)
        p.grad = (p.summed_grad + noise).view_as(p)
        _mark_as_processed(p.summed_grad)


def use_secure_noise(optimizer, rng: ChaChaRNG) -> None:
    optimizer.add_noise = types.MethodType(lambda self: _secure_add_noise(self, rng), optimizer)
    optimizer.generator = None


def privacy_engine(accountant: str = "rdp"):
    """An Opacus PrivacyEngine; its 'Secure RNG turned off' warning is replaced by one log
    line per process that says what fedlora does instead."""
    global _noticed
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant=accountant)
    if not _noticed:
        _noticed = True
        log.warning(_NOTICE)
    return engine


def make_private(engine, *, module, optimizer, data_loader: DataLoader, noise_multiplier: float,
                 max_grad_norm: float | list[float], clipping: str = "flat", rng: ChaChaRNG | None = None):
    """``engine.make_private`` with Poisson sampling and noise from a fresh ChaCha20 stream."""
    rng = rng or ChaChaRNG()
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=module, optimizer=optimizer, data_loader=secure_poisson_loader(data_loader, rng),
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=False, clipping=clipping,
    )
    dp_model.forbid_grad_accumulation()  # what poisson_sampling=True would have set
    use_secure_noise(dp_optimizer, rng)
    return dp_model, dp_optimizer, dp_loader
