"""One place for every setting of a federation.

`FedConfig` is the single source of defaults. The Flower run config in
`pyproject.toml` mirrors it (a test keeps them equal), the CLI builds it from flags,
and the server ships the client-relevant part of it to every client in each round's
ConfigRecord, so simulation and deployment read settings the same way.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any, Mapping

from shared.errors import FedLoraError


@dataclass
class FedConfig:
    # model and adapter
    model: str = "minilm"
    lora: str = "ffa"  # "ffa" (A frozen from a shared seed, only B trains) or "plain"
    lora_rank: int = 4
    lora_alpha: int = 16
    lora_targets: str = ""  # comma separated; empty: the model's attention q/v projections
    lora_layers: int = 0  # adapt only the top N transformer layers (0: all); backward stops below them
    max_length: int = 0  # 0: from the data (95th percentile of token counts, bucketed); N: exactly N tokens
    max_length_cap: int = 256  # the longest length the data-driven choice may pick (time and memory budget)
    # data
    data: str = ""  # empty: the synthetic marketing federation
    test_data: str = ""
    text_column: str = "text"
    label_column: str = "label"
    partition_by: str = "brand"  # natural partitioning: one client per value; empty: use `partition`
    partition: str = "iid"  # "iid" or "dirichlet:ALPHA" when partition_by is empty
    labels: str = ""  # JSON list of the global label names; derived from the data when empty
    min_client_examples: int = 20  # simulation: owners with fewer rows are left out (and counted)
    brands: int = 6  # synthetic data only: one data owner per brand
    examples_per_brand: int = 800  # synthetic data only
    test_size: int = 800  # synthetic data only
    # federation
    num_clients: int = 6
    fraction: float = 1.0
    rounds: int = 8
    local_epochs: int = 1
    batch_size: int = 128  # expected (Poisson) batch size under DP
    optimizer: str = "adam"  # "adam" for both; "mixed": SGD+momentum on the head, Adam on the adapter; "sgd" for both
    lr: float = 0.03  # LoRA adapter tensors
    head_lr: float = 0.2  # task head
    seed: int = 0
    # privacy
    dp: bool = True
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 0.3
    clipping: str = "flat"  # "split": head and adapter clipped to their own share of --max-grad-norm; "flat": one norm
    # secure aggregation
    secure_agg: bool = True
    secagg_threshold: float = 0.0  # 0: protocol default
    secagg_neighbours: int = 0  # 0: protocol default
    secagg_timeout: float = 300.0  # seconds each secure-aggregation stage waits for replies
    secagg_max_weight: int = 16384  # cap on one client's weight (examples) in the masked sum; 1: equal weights
    # outputs and resources
    local_baseline: bool = False  # simulation: also train each owner alone at the same budget, to compare
    output: str = "runs/latest"
    resume: str = ""
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    # customer segments (`fedlora segment`): federated k-means on sentence embeddings
    segment_k: int = 8
    segment_rounds: int = 5  # Lloyd rounds after the federated-mean initialisation
    segment_epsilon: float = 2.0  # each owner's budget over all of a segmentation's releases
    segment_checkpoint: str = ""  # a run's output or round folder: embed with its adapted encoder; empty: base model

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.lora not in ("ffa", "plain"):
            raise FedLoraError(f"--lora must be 'ffa' or 'plain', got {self.lora!r}")
        if self.optimizer not in ("mixed", "sgd", "adam"):
            raise FedLoraError(f"--optimizer must be 'mixed', 'sgd' or 'adam', got {self.optimizer!r}")
        if self.clipping not in ("split", "flat"):
            raise FedLoraError(f"--clipping must be 'split' or 'flat', got {self.clipping!r}")
        if self.partition != "iid" and not self.partition.startswith("dirichlet:"):
            raise FedLoraError(f"--partition must be 'iid' or 'dirichlet:ALPHA', got {self.partition!r}")
        if self.partition.startswith("dirichlet:"):
            try:
                alpha = float(self.partition.split(":", 1)[1])
            except ValueError:
                alpha = -1.0
            if alpha <= 0:
                raise FedLoraError(f"--partition dirichlet:ALPHA needs a positive ALPHA, got {self.partition!r}")
        if self.num_clients < 1:
            raise FedLoraError("--num-clients must be at least 1")
        if not 0.0 < self.fraction <= 1.0:
            raise FedLoraError("--fraction must be in (0, 1]")
        if self.rounds < 1 or self.local_epochs < 1:
            raise FedLoraError("--rounds and --local-epochs must be at least 1")
        if self.dp:
            if not self.target_epsilon > 0:
                raise FedLoraError(f"epsilon target cannot be met: --target-epsilon must be positive, got {self.target_epsilon}")
            if not 0.0 < self.delta < 1.0:
                raise FedLoraError(f"--delta must be in (0, 1), got {self.delta}")
        if not (self.lr > 0 and self.head_lr > 0):
            raise FedLoraError(f"--lr and --head-lr must be positive, got {self.lr} and {self.head_lr}")
        if not self.max_grad_norm > 0:
            raise FedLoraError(f"--max-grad-norm must be positive, got {self.max_grad_norm}")
        if self.max_length < 0 or self.max_length_cap < 8:
            raise FedLoraError("--max-length must be 0 (from the data) or positive, --max-length-cap at least 8")
        if self.batch_size < 1:
            raise FedLoraError("--batch-size must be at least 1")
        if self.secagg_max_weight < 1 or not self.secagg_timeout > 0:
            raise FedLoraError("--secagg-max-weight must be at least 1 and --secagg-timeout positive")
        if self.segment_k < 2 or self.segment_rounds < 1:
            raise FedLoraError(f"--k must be at least 2 and --rounds at least 1, got {self.segment_k} and {self.segment_rounds}")
        if self.dp and not (0 < self.segment_epsilon < float("inf")):
            raise FedLoraError(f"epsilon target cannot be met: --target-epsilon must be positive, got {self.segment_epsilon}")

    @property
    def dirichlet_alpha(self) -> float | None:
        return float(self.partition.split(":", 1)[1]) if self.partition.startswith("dirichlet:") else None

    @property
    def label_names(self) -> list[str]:
        return json.loads(self.labels) if self.labels else []

    def replace(self, **changes: Any) -> "FedConfig":
        return dataclasses.replace(self, **changes)

    # Flower run config uses hyphenated keys and flat scalars.
    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FedConfig":
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                continue
            default = known[name].default
            values[name] = _coerce(name, value, type(default))
        return cls(**values)


def _coerce(name: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise FedLoraError(f"config value {name}={value!r} is not a valid {kind.__name__}") from exc
