"""The data owner's privacy policy, enforced at the client on every round.

The server's per-round config asks for a privacy setting (DP on or off, epsilon, delta,
clipping norm, rounds, secure aggregation); the owner's policy, set from the agent's local
node config (`fedlora client` flags), decides whether to take part. The server can ask
for less privacy loss than the policy allows (tighten), never for more (loosen): a request
that breaks the policy is declined with a `DeclineCode`, before the ledger is touched.

A reply never carries the reason as text: the server gets the integer code only; the
details go to the owner's local log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, Mapping

from shared.config import FedConfig
from shared.errors import FedLoraError


class DeclineCode(IntEnum):
    """`declined-code` in a client's reply (0: it trained)."""

    TRAINED = 0
    BUDGET = 1  # the next round would exceed the owner's epsilon budget
    DP_REQUIRED = 2  # the server asked for a round without DP
    EPSILON = 3  # requested epsilon above the owner's max
    DELTA = 4  # requested delta above the owner's max
    CLIP = 5  # requested clipping norm above the owner's max
    SECURE_AGG_REQUIRED = 6  # the update would leave unmasked
    SECAGG_THRESHOLD = 7  # secure-aggregation threshold below the owner's min
    ROUNDS = 8  # more rounds requested than the owner's max
    REQUEST = 9  # the request cannot be planned for this data (batch, delta vs 1/N, unmeetable epsilon)
    LEDGER = 10  # the ledger is unreadable, invalid or in use (failure)
    DATA = 11  # the local data cannot be read (failure)
    INTERNAL = 12  # anything else went wrong at the client (failure)
    TASK = 13  # the server asked for another task than the owner joined for (`fedlora client --task`)


FAILURE_CODES = frozenset({DeclineCode.LEDGER, DeclineCode.DATA, DeclineCode.INTERNAL})
"""Codes the server counts as failed clients rather than declines."""


class Declined(Exception):
    """Decline this round: `code` (and the numbers in `report`, e.g. the epsilon already
    spent) go to the server, `detail` only to the owner's log."""

    def __init__(self, code: DeclineCode, detail: str, report: dict | None = None) -> None:
        super().__init__(detail)
        self.code = DeclineCode(code)
        self.report = dict(report or {})


@dataclass(frozen=True)
class SecAggInfo:
    """What the client itself saw of secure aggregation this round (from its own mod)."""

    threshold: int  # survivors needed before the server may unmask the sum
    group_size: int  # this client's neighbourhood including itself


def _opt(flag: str, help: str, **kw) -> Any:
    return field(metadata={"flag": flag, "help": help}, **kw)


@dataclass(frozen=True)
class OwnerPolicy:
    require_dp: bool = _opt("--allow-no-dp", "decline every round the server requests without DP "
                            "(the flag turns this off, for non-private baselines)", default=True)
    max_epsilon: float = _opt("--max-epsilon", "decline runs whose requested epsilon (over all rounds) is above this",
                              default=8.0)
    max_delta: float = _opt("--max-delta", "decline runs whose requested delta is above this", default=1e-5)
    max_grad_norm: float = _opt("--max-clip-norm", "decline runs whose per-example clipping norm is above this",
                                default=1.0)
    require_secure_agg: bool = _opt("--allow-plain-aggregation", "decline every round whose update would leave "
                                    "unmasked, i.e. without secure aggregation (the flag turns this off)", default=True)
    min_secagg_threshold: int = _opt("--min-secagg-threshold", "decline secure-aggregation rounds in which the server "
                                     "may unmask the sum with fewer than this many surviving clients", default=2)
    max_rounds: int = _opt("--max-rounds", "decline runs that plan more rounds than this", default=100)

    def __post_init__(self) -> None:
        if not (0 < self.max_epsilon < math.inf):
            raise FedLoraError(f"--max-epsilon must be positive, got {self.max_epsilon}")
        if not 0 < self.max_delta < 1:
            raise FedLoraError(f"--max-delta must be in (0, 1), got {self.max_delta}")
        if not (0 < self.max_grad_norm < math.inf):
            raise FedLoraError(f"--max-clip-norm must be positive, got {self.max_grad_norm}")
        if self.min_secagg_threshold < 2:
            raise FedLoraError(f"--min-secagg-threshold must be at least 2, got {self.min_secagg_threshold}")
        if self.max_rounds < 1:
            raise FedLoraError(f"--max-rounds must be at least 1, got {self.max_rounds}")

    # --- where a policy comes from ----------------------------------------------------

    @staticmethod
    def node_key(name: str) -> str:
        return "policy-" + name.replace("_", "-")

    def to_node_config(self) -> dict[str, Any]:
        return {self.node_key(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "OwnerPolicy":
        """The owner's policy: every `policy-*` key of the local node config, defaults for the rest."""
        values = {}
        for f in fields(cls):
            key = cls.node_key(f.name)
            if key in node_config:
                raw = node_config[key]
                kind = type(f.default)
                if kind is bool:
                    values[f.name] = raw if isinstance(raw, bool) else str(raw).strip().lower() in ("1", "true", "yes", "on")
                else:
                    try:
                        values[f.name] = kind(raw)
                    except (TypeError, ValueError):
                        raise FedLoraError(f"node config {key}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    @classmethod
    def from_run(cls, cfg: FedConfig) -> "OwnerPolicy":
        """Simulation: the researcher runs server and clients, so the run's own settings are
        the policy (same checks, nothing to decline); secure aggregation is not required,
        because a 1-client round runs without it."""
        return cls(require_dp=cfg.dp, max_epsilon=cfg.target_epsilon if cfg.dp else cls.max_epsilon,
                   max_delta=cfg.delta if cfg.dp else cls.max_delta, max_grad_norm=cfg.max_grad_norm,
                   require_secure_agg=False, max_rounds=cfg.rounds)

    @classmethod
    def for_node(cls, node_config: Mapping[str, Any], cfg: FedConfig) -> "OwnerPolicy":
        """Deployment (the owner's own file in `data-path`): the owner's policy, defaults
        included, whatever the server sends. Simulation: the run's settings."""
        if "data-path" in node_config or any(k.startswith("policy-") for k in node_config):
            return cls.from_node_config(node_config)
        return cls.from_run(cfg)

    # --- the check --------------------------------------------------------------------

    def check(self, cfg: FedConfig, secagg: SecAggInfo | None) -> None:
        """Raise `Declined` if the server's request `cfg` breaks this policy."""
        if not cfg.dp:
            if self.require_dp:
                raise Declined(DeclineCode.DP_REQUIRED, "the server asked to train without DP; this owner requires DP")
        else:
            if cfg.target_epsilon > self.max_epsilon:
                raise Declined(DeclineCode.EPSILON, f"requested epsilon {cfg.target_epsilon} > policy max {self.max_epsilon}")
            if cfg.delta > self.max_delta:
                raise Declined(DeclineCode.DELTA, f"requested delta {cfg.delta} > policy max {self.max_delta}")
            if cfg.max_grad_norm > self.max_grad_norm:
                raise Declined(DeclineCode.CLIP, f"requested clipping norm {cfg.max_grad_norm} > policy max {self.max_grad_norm}")
        if cfg.rounds > self.max_rounds:
            raise Declined(DeclineCode.ROUNDS, f"requested {cfg.rounds} rounds > policy max {self.max_rounds}")
        if secagg is None:
            if self.require_secure_agg:
                raise Declined(DeclineCode.SECURE_AGG_REQUIRED, "this round's update would leave without secure aggregation")
        elif secagg.threshold < self.min_secagg_threshold:
            raise Declined(DeclineCode.SECAGG_THRESHOLD, f"secure-aggregation threshold {secagg.threshold} < policy "
                           f"min {self.min_secagg_threshold}")


def check_task(node_config: Mapping[str, Any], request: FedConfig) -> None:
    """An owner that joined for one task (`task` in its node config) trains no other: a
    server switching a sentiment federation to copy generation would otherwise fit the
    owner's data to a model and loss the owner never agreed to."""
    agreed = node_config.get("task")
    if agreed and request.task != str(agreed):
        raise Declined(DeclineCode.TASK, f"the server asked for task {request.task!r}; this owner joined for "
                       f"{agreed!r} (fedlora client --task)")


def effective_config(cfg: FedConfig, node_config: Mapping[str, Any]) -> FedConfig:
    """The owner's own budget (`target-epsilon` in the node config) tightens the server's,
    never loosens it; where the owner's agent trains (`device`) is the owner's choice alone."""
    if "device" in node_config:
        cfg = cfg.replace(device=str(node_config["device"]))
    if "target-epsilon" in node_config:
        cfg = cfg.replace(target_epsilon=min(cfg.target_epsilon, float(node_config["target-epsilon"])))
    return cfg
