"""Each client's own (epsilon, delta) ledger, composed over every round it trains.

The noise multiplier is calibrated once for the client's whole planned participation
(every round of the run), and the accountant's history is carried between rounds by
the caller (Flower context state in simulation, a local file in deployment), because
the ClientApp and the Opacus engine are rebuilt each round.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from client.label_prior import RELEASE_RATE, logit_adjusted, release_counts
from shared.atomic import atomic_write
from shared.cache import cache_dir
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
    prior_noise: float = 0.0  # the label prior's release noise, planned within the budget (0: no release)
    center_noise: float = 0.0  # the mean feature's release noise (client/feature_center.py; 0: no release)


MIN_STEPS_PER_EPOCH = 4


def client_batch_size(cfg: FedConfig, num_examples: int) -> int:
    """The run's expected batch, shrunk for an owner too small to fill it.

    A small owner keeps at least MIN_STEPS_PER_EPOCH Poisson steps per epoch, so it
    trains at its own sampling rate instead of being refused; its noise multiplier
    and epsilon are computed for that rate.
    """
    return max(1, min(cfg.batch_size, num_examples // MIN_STEPS_PER_EPOCH))


CALIBRATION_TOLERANCE = 0.01  # Opacus's get_noise_multiplier default: the epsilon reached is within this of the target


def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, fixed: tuple) -> float:
    """The smallest noise multiplier (within Opacus's tolerance) whose ``steps`` composed with the
    ``fixed`` history entries stay within ``target_epsilon``: Opacus's bisection, over a history."""
    def eps(sigma: float) -> float:
        return history_epsilon([*fixed, (sigma, sample_rate, steps)], delta)

    if fixed and history_epsilon(list(fixed), delta) >= target_epsilon:
        raise ValueError("the one-off releases (label prior, mean feature) alone spend the budget")
    lo, hi = 0.0, 10.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError("the noise multiplier is too large")
    while True:
        mid = (lo + hi) / 2
        spent = eps(mid)
        if spent > target_epsilon:
            lo = mid
        else:
            hi = mid
            if target_epsilon - spent < CALIBRATION_TOLERANCE:
                return hi


@lru_cache(maxsize=4096)
def _noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, fixed: tuple = ()) -> float:
    """Opacus's calibration, a bisection over the accountant (~6 s at these orders). A client
    asks the same question every round, and in simulation every worker and the preflight ask
    it for each owner size, so the answer is also kept in the local cache. A cached answer is
    used only if the accountant confirms it: its epsilon is at most the target and within
    Opacus's tolerance of it (one RDP vector, which the ledger needs anyway). A wrong or
    tampered file can cost a recalibration, never budget."""
    key = json.dumps([target_epsilon, delta, sample_rate, steps, len(ALPHAS), ALPHAS[-1], *([list(fixed)] if fixed else [])])
    path = cache_dir("noise-multipliers", hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
    try:
        cached = json.loads(path.read_text())
        sigma = float(cached["sigma"])
        if cached.get("key") == key and 0 < sigma < math.inf:
            spent = history_epsilon([*fixed, (sigma, sample_rate, steps)], delta)
            if target_epsilon - CALIBRATION_TOLERANCE <= spent <= target_epsilon:
                return sigma
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if fixed:
        sigma = _calibrate(target_epsilon, delta, sample_rate, steps, fixed)
    else:
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                     steps=steps, accountant="rdp", alphas=ALPHAS, epsilon_tolerance=CALIBRATION_TOLERANCE)
    try:  # atomic: concurrent workers never read a torn file
        atomic_write(path, json.dumps({"key": key, "sigma": sigma}))
    except OSError:
        pass  # a read-only or full cache only costs the next process a recalibration
    return sigma


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
    prior_noise = _affordable(cfg.label_prior_noise if uses_label_prior(cfg) else 0.0, cfg)
    center_noise = _affordable(cfg.center_noise if uses_centering(cfg) else 0.0, cfg)
    fixed = tuple((noise, RELEASE_RATE, 1) for noise in (prior_noise, center_noise) if noise)
    try:
        sigma = _noise_multiplier(cfg.target_epsilon, cfg.delta, sample_rate, steps_per_round * cfg.rounds, fixed)
    except ValueError as exc:
        raise FedLoraError(f"epsilon target cannot be met: --target-epsilon {cfg.target_epsilon} ({exc})") from exc
    if sigma > MAX_NOISE_MULTIPLIER:
        raise FedLoraError(
            f"epsilon target cannot be met: --target-epsilon {cfg.target_epsilon} over {cfg.rounds} rounds needs noise "
            f"multiplier {sigma:.0f} (> {MAX_NOISE_MULTIPLIER:.0f}) for {num_examples} examples; raise the target or lower rounds/epochs"
        )
    return PrivacyPlan(sigma, sample_rate, steps_per_round, batch_size, prior_noise, center_noise)


def _affordable(noise: float, cfg: FedConfig) -> float:
    """A one-off release's noise, or 0 (no release) where the release alone would cost over
    half the budget: a budget that small is better spent on training. A request for a
    tiny noise (the server's setting) can so never take the owner's budget."""
    if noise and history_epsilon([(noise, RELEASE_RATE, 1)], cfg.delta) > cfg.target_epsilon / 2:
        return 0.0
    return noise


def uses_label_prior(cfg: FedConfig) -> bool:
    """Whether this run's DP training releases the owner's label prior (client/label_prior.py)."""
    return bool(cfg.dp and logit_adjusted(cfg))


def uses_centering(cfg: FedConfig) -> bool:
    """Whether this run's DP probe rounds release the owner's mean feature and train the
    head centred on it (client/feature_center.py): a task with a head, --center-noise set."""
    from shared.tasks import get_task

    return bool(cfg.dp and cfg.center_noise > 0 and not get_task(cfg).generative)


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at every order in ALPHAS. Opacus
    recomputes it for every entry of the history on every query (~0.4 s each, mostly the
    fractional orders' series); RDP composes linearly in steps, so one vector per
    (noise, rate) serves every round of every client with that plan."""
    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=ALPHAS)
    rdp.setflags(write=False)
    return rdp


def history_epsilon(history, delta: float) -> float:
    """Epsilon of an RDPAccountant history at `delta`: exactly Opacus's
    `RDPAccountant.get_epsilon(delta, alphas=ALPHAS)` (the same sums in the same order),
    with each entry's per-step RDP cached."""
    if not history:
        return 0.0
    rdp = sum(_rdp_per_step(float(sigma), float(rate)) * int(steps) for sigma, rate, steps in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def _total_steps(history) -> int:
    return sum(int(h[2]) for h in history)


@dataclass
class PrivacyLedger:
    """The owner's record of privacy spent. On disk it is trusted only if it adds up: every
    accountant entry is a valid (noise multiplier, sample rate, steps) triple and the steps
    of the rounds in `rounds_trained` (`round_steps`) sum to the accountant's steps."""

    delta: float
    target_epsilon: float
    accountant_state: dict = field(default_factory=lambda: RDPAccountant().state_dict())
    rounds_trained: list[int] = field(default_factory=list)
    round_steps: list[int] | None = field(default_factory=list)  # None: a file from before per-round steps
    label_counts: list[float] | None = None  # the noisy label counts released for the label prior
    label_releases: int = 0  # accountant entries (noise, 1.0, 1) that released label counts
    feature_sum: list[float] | None = None  # the noisy (sum of features, count) released for centring
    center_releases: int = 0  # accountant entries (noise, 1.0, 1) that released it

    def accountant(self) -> RDPAccountant:
        """A fresh accountant on a copy of the history: Opacus shares the list, and a
        what-if query must never leak into the recorded spend."""
        acc = RDPAccountant()
        acc.load_state_dict(copy.deepcopy(self.accountant_state))
        return acc

    def epsilon(self) -> float:
        return history_epsilon(self.accountant_state["history"], self.delta)

    def epsilon_after(self, plan: PrivacyPlan) -> float:
        """Epsilon if the client trained one more round under `plan` (the recorded history
        is not touched: a what-if query never leaks into the spend)."""
        history = [*self.accountant_state["history"], (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
        if plan.prior_noise and self.label_counts is None:  # the releases this round would make first
            history.append((plan.prior_noise, RELEASE_RATE, 1))
        if plan.center_noise and self.feature_sum is None:
            history.append((plan.center_noise, RELEASE_RATE, 1))
        return history_epsilon(history, self.delta)

    def label_prior(self, labels, num_labels: int, noise: float) -> list[float] | None:
        """The owner's noisy label counts: released (Gaussian mechanism, accounted as one
        full-batch step at ``noise``) the first time, then the ledger's copy every round.
        None when the ledger holds counts for another label set (an earlier run's task): no
        second release, which :meth:`epsilon_after` would not have counted; no adjustment."""
        if self.label_counts is not None and len(self.label_counts) != num_labels:
            return None
        if self.label_counts is None:
            self.label_counts = release_counts(labels, num_labels, noise)
            self.accountant_state["history"].append((float(noise), RELEASE_RATE, 1))
            self.label_releases += 1
        return self.label_counts

    def feature_center(self, features, noise: float) -> list[float]:
        """The owner's noisy feature sum and count (client/feature_center.py): released
        (accounted as one full-batch step at ``noise``) the first time, then the ledger's
        copy. ``features`` is called only for that first release."""
        if self.feature_sum is None:
            from client.feature_center import release_sum

            self.feature_sum = release_sum(features(), noise)
            self.accountant_state["history"].append((float(noise), RELEASE_RATE, 1))
            self.center_releases += 1
        return self.feature_sum

    def can_train(self, plan: PrivacyPlan, tolerance: float = 1e-6) -> bool:
        return self.epsilon_after(plan) <= self.target_epsilon * (1 + tolerance)

    def record(self, accountant: RDPAccountant, server_round: int) -> None:
        steps = _total_steps(accountant.history) - _total_steps(self.accountant_state["history"])
        self.accountant_state = copy.deepcopy(accountant.state_dict())
        self.rounds_trained.append(server_round)
        if self.round_steps is not None:
            self.round_steps.append(steps)

    def to_json(self) -> str:
        out = {
            "delta": self.delta, "target_epsilon": self.target_epsilon,
            "history": [list(h) for h in self.accountant_state["history"]],
            "rounds_trained": self.rounds_trained,
        }
        if self.round_steps is not None:
            out["round_steps"] = self.round_steps
        if self.label_releases:
            out["label_counts"], out["label_releases"] = self.label_counts, self.label_releases
        if self.center_releases:
            out["feature_sum"], out["center_releases"] = self.feature_sum, self.center_releases
        return json.dumps(out)

    def save(self, path: Path) -> None:
        """Atomic and durable: a temporary file in the same folder, fsynced, renamed over
        the ledger, then the folder fsynced, so a crash or power cut leaves either the old
        or the new spend, never a torn or lost file. The caller holds `lock(path)`."""
        atomic_write(path, self.to_json(), private=True, durable=True)

    @staticmethod
    @contextmanager
    def lock(path: Path | None, timeout: float = 10.0) -> Iterator[None]:
        """Exclusive fcntl lock on `<ledger>.lock` for a whole round (read, check, train,
        record, write), so two processes on one ledger can never both spend the same budget."""
        if path is None:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise FedLoraError(f"privacy ledger {path} is in use by another process; "
                                           "one agent per ledger") from None
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)  # releases the lock

    @classmethod
    def load(cls, path: Path, cfg: FedConfig) -> "PrivacyLedger":
        try:
            ledger = cls.from_json(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise FedLoraError(f"privacy ledger {path} is unreadable ({exc.strerror}); refusing to train with an unknown spend") from None
        except FedLoraError as exc:
            raise FedLoraError(f"privacy ledger {path} is invalid ({exc}); refusing to train with an unknown spend") from None
        if ledger.delta != cfg.delta:
            raise FedLoraError(f"privacy ledger {path} was kept at delta={ledger.delta}, this run asks delta={cfg.delta}")
        ledger.target_epsilon = cfg.target_epsilon
        return ledger

    @classmethod
    def from_json(cls, text: str) -> "PrivacyLedger":
        """Parse and validate; any defect is one FedLoraError line, never a traceback."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise FedLoraError(f"not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise FedLoraError("not a JSON object")
        missing = {"delta", "target_epsilon", "history", "rounds_trained"} - set(raw)
        if missing:
            raise FedLoraError(f"missing {', '.join(sorted(missing))}")
        delta, target = raw["delta"], raw["target_epsilon"]
        if not (_number(delta) and 0 < delta < 1):
            raise FedLoraError(f"delta {delta!r} not in (0, 1)")
        if not (_number(target) and 0 < target < math.inf):
            raise FedLoraError(f"target_epsilon {target!r} is not a positive number")
        history = raw["history"]
        if not isinstance(history, list):
            raise FedLoraError("history is not a list")
        for h in history:
            if not (isinstance(h, list) and len(h) == 3 and _number(h[0]) and _number(h[1]) and _integer(h[2])
                    and 0 < h[0] < math.inf and 0 < h[1] <= 1 and h[2] >= 1):
                raise FedLoraError(f"history entry {h!r} is not [noise multiplier > 0, sample rate in (0, 1], steps >= 1]")
        rounds = raw["rounds_trained"]
        if not (isinstance(rounds, list) and all(_integer(r) and r >= 0 for r in rounds)):
            raise FedLoraError("rounds_trained is not a list of round numbers")
        releases, counts = _release(raw, "label_releases", "label_counts")
        centers, feature_sum = _release(raw, "center_releases", "feature_sum")
        if sum(1 for h in history if h[1] == RELEASE_RATE and h[2] == 1) < releases + centers:
            raise FedLoraError(f"history does not add up: {releases + centers} releases, fewer release entries in the history")
        total = sum(h[2] for h in history) - releases - centers
        steps = raw.get("round_steps")
        if steps is not None:
            if not (isinstance(steps, list) and all(_integer(s) and s >= 1 for s in steps)):
                raise FedLoraError("round_steps is not a list of positive step counts")
            if len(steps) != len(rounds) or sum(steps) != total:
                raise FedLoraError(f"history does not add up: {len(rounds)} rounds trained with {sum(steps)} steps "
                                   f"({len(steps)} step counts), accountant has {total} steps")
        elif bool(history) != bool(rounds) or total < len(rounds):
            raise FedLoraError(f"history does not add up: {len(rounds)} rounds trained, accountant has {total} steps")
        state = RDPAccountant().state_dict()
        state["history"] = [(float(h[0]), float(h[1]), int(h[2])) for h in history]
        return cls(float(delta), float(target), state, [int(r) for r in rounds],
                   None if steps is None else [int(s) for s in steps],
                   None if counts is None else [float(c) for c in counts], int(releases),
                   None if feature_sum is None else [float(c) for c in feature_sum], int(centers))


def _release(raw: dict, count_key: str, values_key: str) -> tuple[int, list | None]:
    """A one-off release kept in a ledger file: how many accountant entries made it, and
    the released values, present exactly when that count is not 0."""
    count, values = raw.get(count_key, 0), raw.get(values_key)
    if not (_integer(count) and count >= 0) or bool(count) != (values is not None):
        raise FedLoraError(f"{count_key} and {values_key} do not match")
    if values is not None and not (isinstance(values, list) and values and all(_number(c) for c in values)):
        raise FedLoraError(f"{values_key} is not a list of numbers")
    return count, values


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
