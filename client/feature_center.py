"""The probe rounds train the task head in coordinates centred at the owner's mean feature,
released under DP and accounted.

Sentence embeddings share a large common component (all-MiniLM-L6-v2 on the complaint
narratives: mean feature of norm 0.58 against 0.81 for the rest of a row), which couples
the head's bias with its weights along that direction, and SGD crawls: replayed on frozen
embeddings (simulations/replay_probe.py), the 8-label complaint probe with no noise at all
stands at 0.608 macro-F1 after 4 rounds, against 0.736 for a converged logistic
regression. Training the head on ``x - mu`` (with ``b' = b + W mu``, so the model computes
the same function) removes the coupling and lets the head take a larger step: 0.672
without noise, and under DP at epsilon 8 0.607 -> 0.631 after 4 rounds on the complaints
(0.625 with the larger step alone) and 0.723 -> 0.726 on the airline tweets, where the
first round gains most (0.682 -> 0.707) (simulations/results/replay_probe_center_s21.json).

``mu`` must not be an exact function of the owner's rows: DP-SGD's guarantee assumes each
row's gradient depends on that row alone. So the owner releases ``sum_i (x_i, 1) / sqrt 2``
(each row's term clipped to norm 1: L2 sensitivity 1 under adding or removing a row) with
Gaussian noise from its CSPRNG, once, as an entry ``(noise, 1.0, 1)`` of its accountant
history; ``mu`` is the noisy sum over the noisy count. Each owner centres at its own
``mu`` and converts the head back (``b = b' - W mu``) before the update leaves, so the
server and the other owners only ever see ordinary head weights.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

from client.secure_random import ChaChaRNG


def head_layer(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The trainable task head when it is one Linear with a bias (the layer the bias can
    absorb ``W mu`` in), else None: then the head trains uncentred."""
    trainable = {id(p) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
              and m.bias is not None and {id(m.weight), id(m.bias)} <= trainable]
    return layers[0] if len(layers) == 1 else None


def release_sum(features: torch.Tensor, noise: float) -> list[float]:
    """``sum_i (x_i, 1) / sqrt 2`` (each term clipped to norm 1) plus N(0, noise^2) per
    coordinate from a fresh ChaCha20 stream, drawn as DP-SGD's noise is."""
    rows = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], dim=1) / math.sqrt(2)
    sums = (rows / rows.norm(dim=1, keepdim=True).clamp(min=1.0)).sum(0)
    return (sums + ChaChaRNG().gaussian_noise(noise, sums)).tolist()


def mean_of(released: list[float], width: int) -> torch.Tensor | None:
    """The mean feature from a release, or None when it is for another width (an earlier
    run's model) or its noisy count is too small to divide by."""
    if len(released) != width + 1 or released[-1] < 1.0:
        return None
    return torch.tensor(released[:-1], dtype=torch.float32) / released[-1]


@contextmanager
def centred(head: torch.nn.Linear, mu: torch.Tensor) -> Iterator[None]:
    """Inside, the head reads ``x - mu`` with bias ``b + W mu`` (the same function, so the
    per-example gradients Opacus sees are those of centred features); on the way out the
    bias goes back to ``b' - W mu`` for the weights it then has."""
    mu = mu.to(head.weight.device, head.weight.dtype)
    with torch.no_grad():
        head.bias.add_(head.weight @ mu)
    handle = head.register_forward_pre_hook(lambda module, args: (args[0] - mu, *args[1:]))
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            head.bias.sub_(head.weight @ mu)
