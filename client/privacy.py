"""Each client's own (epsilon, delta) ledger, composed over every round it trains.

The noise multiplier is calibrated once for the client's whole planned participation
(every round of the run), and the accountant's history is carried between rounds by
the caller (Flower context state in simulation, a local file in deployment), because
the ClientApp and the Opacus engine are rebuilt each round.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from shared.config import FedConfig
from shared.errors import FedLoraError

MAX_NOISE_MULTIPLIER = 50.0
# RDP orders searched for the tightest (epsilon, delta) conversion: Opacus's defaults stop
# at 63, where small budgets with large noise find their optimum at the edge (and warn).
ALPHAS = [1 + x / 20 for x in range(1, 100)] + [float(a) for a in range(6, 64)] + [float(a) for a in range(64, 1025, 16)]


@dataclass(frozen=True)
class PrivacyPlan:
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    batch_size: int  # this client's expected Poisson batch: the run's, or less for a small owner


MIN_STEPS_PER_EPOCH = 4


def client_batch_size(cfg: FedConfig, num_examples: int) -> int:
    """The run's expected batch, shrunk for an owner too small to fill it.

    A small owner keeps at least MIN_STEPS_PER_EPOCH Poisson steps per epoch, so it
    trains at its own sampling rate instead of being refused; its noise multiplier
    and epsilon are computed for that rate.
    """
    return max(1, min(cfg.batch_size, num_examples // MIN_STEPS_PER_EPOCH))


def plan_privacy(cfg: FedConfig, num_examples: int) -> PrivacyPlan:
    """Noise multiplier for this client's own data size over the whole planned run.

    Raises FedLoraError only where DP-SGD cannot meet the budget (no data, delta not
    below 1/N, or a noise multiplier beyond MAX_NOISE_MULTIPLIER); the client then
    declines its rounds while the run goes on.
    """
    if num_examples < 1:
        raise FedLoraError("client has no examples")
    if not cfg.delta < 1.0 / num_examples:
        raise FedLoraError(f"--delta {cfg.delta} must be below 1/N = {1.0 / num_examples:.2e} for a client with N={num_examples} examples")
    batch_size = client_batch_size(cfg, num_examples)
    # Opacus's Poisson loader: sample_rate = 1 / len(loader), one step per batch
    batches = math.ceil(num_examples / batch_size)
    sample_rate = 1.0 / batches
    steps_per_round = cfg.local_epochs * batches
    try:
        sigma = get_noise_multiplier(
            target_epsilon=cfg.target_epsilon, target_delta=cfg.delta, sample_rate=sample_rate,
            steps=steps_per_round * cfg.rounds, accountant="rdp", alphas=ALPHAS,
        )
    except ValueError as exc:
        raise FedLoraError(f"epsilon target cannot be met: --target-epsilon {cfg.target_epsilon} ({exc})") from exc
    if sigma > MAX_NOISE_MULTIPLIER:
        raise FedLoraError(
            f"epsilon target cannot be met: --target-epsilon {cfg.target_epsilon} over {cfg.rounds} rounds needs noise "
            f"multiplier {sigma:.0f} (> {MAX_NOISE_MULTIPLIER:.0f}) for {num_examples} examples; raise the target or lower rounds/epochs"
        )
    return PrivacyPlan(sigma, sample_rate, steps_per_round, batch_size)


@dataclass
class PrivacyLedger:
    delta: float
    target_epsilon: float
    accountant_state: dict = field(default_factory=lambda: RDPAccountant().state_dict())
    rounds_trained: list[int] = field(default_factory=list)

    def accountant(self) -> RDPAccountant:
        """A fresh accountant on a copy of the history: Opacus shares the list, and a
        what-if query must never leak into the recorded spend."""
        acc = RDPAccountant()
        acc.load_state_dict(copy.deepcopy(self.accountant_state))
        return acc

    def epsilon(self) -> float:
        acc = self.accountant()
        return float(acc.get_epsilon(self.delta, alphas=ALPHAS)) if acc.history else 0.0

    def epsilon_after(self, plan: PrivacyPlan) -> float:
        """Epsilon if the client trained one more round under `plan`."""
        acc = self.accountant()
        acc.history.append((plan.noise_multiplier, plan.sample_rate, plan.steps_per_round))
        return float(acc.get_epsilon(self.delta, alphas=ALPHAS))

    def can_train(self, plan: PrivacyPlan, tolerance: float = 1e-6) -> bool:
        return self.epsilon_after(plan) <= self.target_epsilon * (1 + tolerance)

    def record(self, accountant: RDPAccountant, server_round: int) -> None:
        self.accountant_state = copy.deepcopy(accountant.state_dict())
        self.rounds_trained.append(server_round)

    def to_json(self) -> str:
        return json.dumps({
            "delta": self.delta, "target_epsilon": self.target_epsilon,
            "history": [list(h) for h in self.accountant_state["history"]],
            "rounds_trained": self.rounds_trained,
        })

    def save(self, path: Path) -> None:
        """Atomic: a crash mid-write never loses the epsilon already spent."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, cfg: FedConfig) -> "PrivacyLedger":
        try:
            ledger = cls.from_json(path.read_text())
        except (OSError, ValueError, KeyError) as exc:
            raise FedLoraError(f"privacy ledger {path} is unreadable ({exc}); refusing to train with an unknown spend") from exc
        if ledger.delta != cfg.delta:
            raise FedLoraError(f"privacy ledger {path} was kept at delta={ledger.delta}, this run asks delta={cfg.delta}")
        ledger.target_epsilon = cfg.target_epsilon
        return ledger

    @classmethod
    def from_json(cls, text: str) -> "PrivacyLedger":
        raw = json.loads(text)
        state = RDPAccountant().state_dict()
        state["history"] = [tuple(h) for h in raw["history"]]
        return cls(raw["delta"], raw["target_epsilon"], state, list(raw["rounds_trained"]))
