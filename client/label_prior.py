"""The owner's label prior for the logit-adjusted loss, released under DP and accounted.

Owners hold skewed label mixes (airline tweets: 36% to 78% negative). DP-SGD's clipping and
noise favour the majority class: on the airline tweets the federation drifted toward it
round after round (neutral recall 0.53 -> 0.28). The logit-adjusted loss (Menon et al.
2021, "Long-tail learning via logit adjustment"; FedLC, Zhang et al. 2022, does the same per
client under label skew) trains on ``softmax(f(x) + tau * log prior)``, so ``f`` itself
learns balanced decisions and the global model no longer inherits each owner's skew.

The prior is computed from the owner's label counts, which are private: under DP they are
released once per owner through the Gaussian mechanism (L2 sensitivity 1: adding or removing
one row changes one count by one), with noise from the client's CSPRNG, and the release
is an entry of the owner's accountant history, ``(noise, 1.0, 1)``: one full-batch Gaussian
step, which the RDP accountant composes with DP-SGD's steps. The noisy counts live in the
owner's ledger and are reused every later round (a new draw would cost budget again).
Without DP the exact counts are used.
"""

from __future__ import annotations

import numpy as np
import torch

from client.secure_random import ChaChaRNG

RELEASE_RATE = 1.0
"""Sample rate of a prior release in the accountant's history: the whole dataset, once.
DP-SGD's entries never have it (every owner takes at least 4 Poisson steps an epoch)."""


def logit_adjusted(cfg) -> bool:
    """Whether this run trains with the logit-adjusted loss: a task scored on balanced
    decisions (``Task.logit_adjust``) and ``--logit-adjust`` above 0."""
    from shared.tasks import get_task

    return bool(cfg.logit_adjust > 0 and get_task(cfg).logit_adjust)


def label_counts(labels: torch.Tensor, num_labels: int) -> np.ndarray:
    """Exact count of each label, 0 .. num_labels - 1."""
    return np.bincount(labels.cpu().numpy().astype(np.int64), minlength=num_labels)[:num_labels]


def release_counts(labels: torch.Tensor, num_labels: int, noise: float) -> list[float]:
    """Label counts plus N(0, noise^2) each, from a fresh ChaCha20 stream (never a seed
    the server chose), drawn as DP-SGD's noise is (:meth:`ChaChaRNG.gaussian_noise`)."""
    counts = torch.tensor(label_counts(labels, num_labels), dtype=torch.float64)
    return (counts + ChaChaRNG().gaussian_noise(noise, counts)).tolist()


def log_prior(counts: list[float], smoothing: float) -> torch.Tensor:
    """log of the label prior from (noisy) counts: negative counts clipped to 0 and
    ``smoothing`` pseudo-counts added to each class (the noise scale under DP), so a small
    owner, whose counts are mostly noise, gets a prior near uniform: a near-zero adjustment."""
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None) + smoothing
    return torch.tensor(np.log(c / c.sum()), dtype=torch.float32)
