"""One place for every setting of a federation.

`FedConfig` is the single source of defaults. The Flower run config in
`pyproject.toml` mirrors it (a test keeps them equal), the CLI builds it from flags,
and the server ships the client-relevant part of it to every client in each round's
ConfigRecord, so simulation and deployment read settings the same way.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from shared.errors import FedLoraError


DEPLOYMENT_STAGE_TIMEOUT = 300.0
"""Default seconds a secure-aggregation stage waits for deployed owners' replies."""


@dataclass
class FedConfig:
    # task (shared/tasks/): what the model predicts from which columns
    task: str = field(default="classify", metadata={"help": "classify (default: text -> label), click (profile + offer -> clicked 0/1) or generate (prompt -> response copy, a causal LM; default model smollm2-135m)"})
    # model and adapter
    model: str = field(default="minilm", metadata={"help": "minilm (default), smollm2-135m, tiny-bert, or a local model folder / HF id"})
    lora: str = field(default="ffa", metadata={"help": "ffa (A frozen from a shared seed, only B trains) or plain"})
    lora_rank: int = 4
    lora_alpha: int = 16
    lora_targets: str = ""  # comma separated; empty: the model's attention q/v projections
    lora_layers: int = field(default=0, metadata={"help": "adapt only the top N transformer layers; the frozen rest runs once per dataset and is cached (0: all)"})
    max_length: int = field(default=0, metadata={"help": "tokens per text; 0: the 95th percentile of each owner's data, bucketed"})
    max_length_cap: int = field(default=256, metadata={"help": "longest length the data-driven choice may pick"})
    # data
    data: str = field(default="", metadata={"help": "CSV, TSV, JSONL or Parquet of the owners' rows (default: synthetic marketing data for the task)"})
    test_data: str = field(default="", metadata={"help": "held-out file for server evaluation (default: 20%% of --data)"})
    text_column: str = field(default="text", metadata={"help": "classify and segment: the column with the text (default: text)"})
    label_column: str = field(default="label", metadata={"help": "the label column; click: 0/1 (default: label)"})
    profile_column: str = field(default="profile", metadata={"help": "click: the customer profile and history column (default: profile)"})
    offer_column: str = field(default="offer", metadata={"help": "click: the offer text column (default: offer)"})
    prompt_column: str = field(default="prompt", metadata={"help": "generate: the instruction / prompt column (default: prompt)"})
    response_column: str = field(default="response", metadata={"help": "generate: the response (copy) column the model learns to write (default: response)"})
    partition_by: str = field(default="brand", metadata={"help": "natural partitioning: one client per value of this column (default: brand on the synthetic data, an iid split over --num-clients with --data)"})
    partition: str = field(default="iid", metadata={"help": "iid or dirichlet:ALPHA (used when --partition-by is not set)"})
    labels: str = field(default="", metadata={"help": "JSON list fixing the global label set (default: from the training data)"})
    min_client_examples: int = field(default=20, metadata={"help": "simulation: leave out owners with fewer rows (default: 20)"})
    brands: int = field(default=6, metadata={"help": "synthetic data: number of brands (data owners)"})
    examples_per_brand: int = field(default=800, metadata={"help": "synthetic data: rows per brand"})
    test_size: int = 800  # synthetic data only
    # federation
    num_clients: int = field(default=6, metadata={"help": "clients (data owners) of an iid split, when no column partitions the data (default: one per brand on the synthetic data, else 6)"})
    fraction: float = 1.0
    rounds: int = 8
    local_epochs: int = 1
    batch_size: int = 128  # expected (Poisson) batch size under DP
    optimizer: str = field(default="mixed", metadata={"help": "mixed: SGD+momentum on the head, Adam on the adapter; adam or sgd for both (under DP, SGD rates are per unit of clipped gradient)"})
    lr: float = field(default=0.03, metadata={"help": "learning rate of the LoRA adapter tensors"})
    head_lr: float = field(default=4.0, metadata={"help": "learning rate of the task head"})
    head_rounds: int = field(default=-1, metadata={"help": "LP-FT: the first N rounds (at most half the run) train only the task head; -1: under DP, C / (C + 6) of the run for C labels (at least 1: a quarter for two labels, half for eight), where the noisy probe improves over rounds; 1 without DP, where one round converges it"})
    freeze_head: bool = field(default=True, metadata={"help": "under DP, after the --head-rounds linear probe the head stays as probed and the adapters take the whole clipping budget (--no-freeze-head: both train, the budget split)"})
    release_average: float = field(default=0.5, metadata={"help": "the model evaluated, saved and released is an exponential average of the rounds' models with this weight on the previous average (0: the last round's as is); post-processing, no privacy cost"})
    eval_every: int = field(default=1, metadata={"help": "evaluate on the held-out set every N rounds and after the last; at scale the server's evaluation can cost more than a round's training"})
    logit_adjust: float = field(default=1.0, metadata={"help": "classify: logit-adjusted loss (Menon et al. 2021) with weight tau on each owner's log label prior, so skewed owners learn balanced decisions (0: plain cross-entropy); under DP the prior is a noisy label count released once per owner and accounted"})
    label_prior_noise: float = field(default=10.0, metadata={"help": "std of the Gaussian noise on each label count of the DP label prior (sensitivity 1); also its pseudo-count toward uniform"})
    cached_probe: bool = field(default=False, metadata={"help": "probe rounds train the head on each row's pooled feature, computed once per round with the encoder in eval mode (its dropout off): probe rounds about 10x faster; off: through the whole model in train mode"})
    center_noise: float = field(default=0.0, metadata={"help": "classify under DP: the probe rounds train the head on features centred at the owner's mean feature, released once with Gaussian noise of this std on the feature sum and count (sensitivity 1) and accounted; 0: off"})
    lr_decay: str = field(default="none", metadata={"help": "none, or cosine: both rates decay to 0.1x over the rounds"})
    seed: int = field(default=0, metadata={"help": "public seed: synthetic data, iid split, initial weights and directions (never the DP noise)"})
    # privacy
    dp: bool = True
    target_epsilon: float = field(default=8.0, metadata={"help": "each client's epsilon budget over the whole run"})
    delta: float = field(default=1e-5, metadata={"help": "DP delta; must be below 1/N for each client's N examples"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "DP per-example clipping norm"})
    clipping: str = field(default="split", metadata={"help": "split: head and adapter each clipped to half the squared budget; flat: one norm"})
    # secure aggregation
    secure_agg: bool = True
    secagg_threshold: float = 0.0  # 0: protocol default
    secagg_neighbours: int = 0  # 0: protocol default
    secagg_timeout: float = field(default=0.0, metadata={"help": "seconds each secure-aggregation stage waits for replies (0: 300 in deployment; in simulation no limit, as virtual clients train one after another)"})
    secagg_max_weight: int = 16384  # cap on one client's weight (examples) in the masked sum; 1: equal weights
    # outputs and resources
    local_baseline: bool = field(default=False, metadata={"help": "simulation: also train each owner alone at the same budget and compare"})
    output: str = field(default="runs/latest", metadata={"help": "folder for summary.json and the other outputs (a run's metrics.csv, checkpoints and plot; segment's centroids.npy and owners/<name>/segments.*)"})
    resume: str = field(default="", metadata={"help": "continue from a checkpoint folder or a previous --output"})
    device: str = field(default="auto", metadata={"help": "where models train and evaluate: auto (a CUDA GPU when one is visible, else the CPU), cpu or cuda"})
    client_cpus: float = field(default=0.0, metadata={"help": "simulation: CPUs (and torch threads) of each Ray worker (0: one, or a share of the cores when a round has fewer clients than cores)"})
    client_gpus: float = field(default=0.0, metadata={"help": "simulation: GPU share of each Ray worker (0: chosen from the model's size and the GPU's free memory when --device puts training on a GPU)"})
    workers: int = field(default=0, metadata={"help": "simulation: Ray workers on this machine, each holding one model and serving virtual clients one after another (0: as many as --client-cpus fits in the CPUs)"})
    ray_address: str = field(default="", metadata={"help": "simulation: attach to a running Ray cluster (host:port of `ray start --head`, or 'auto'); empty: a private Ray instance on this machine"})
    # customer segments (`fedlora segment`): federated k-means on sentence embeddings
    segment_k: int = field(default=8, metadata={"help": "number of segments"})
    segment_rounds: int = field(default=5, metadata={"help": "Lloyd rounds after the federated-mean initialisation"})
    segment_epsilon: float = field(default=2.0, metadata={"help": "each owner's epsilon over the whole segmentation (all its releases)"})
    segment_checkpoint: str = field(default="", metadata={"help": "embed with a federated checkpoint's encoder, a run or round-NNN folder (default: the base model)"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from shared.tasks import TASKS

        if self.task not in TASKS:
            raise FedLoraError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.lora not in ("ffa", "plain"):
            raise FedLoraError(f"--lora must be 'ffa' or 'plain', got {self.lora!r}")
        if self.optimizer not in ("mixed", "sgd", "adam"):
            raise FedLoraError(f"--optimizer must be 'mixed', 'sgd' or 'adam', got {self.optimizer!r}")
        if self.clipping not in ("split", "flat"):
            raise FedLoraError(f"--clipping must be 'split' or 'flat', got {self.clipping!r}")
        if self.lr_decay not in ("none", "cosine"):
            raise FedLoraError(f"--lr-decay must be 'none' or 'cosine', got {self.lr_decay!r}")
        if self.head_rounds < -1:
            raise FedLoraError("--head-rounds must be -1 (automatic), 0 or more")
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
        if self.rounds < 1 or self.local_epochs < 1 or self.eval_every < 1:
            raise FedLoraError("--rounds, --local-epochs and --eval-every must be at least 1")
        if self.dp:
            if not self.target_epsilon > 0:
                raise FedLoraError(f"epsilon target cannot be met: --target-epsilon must be positive, got {self.target_epsilon}")
            if not 0.0 < self.delta < 1.0:
                raise FedLoraError(f"--delta must be in (0, 1), got {self.delta}")
        if not (self.lr > 0 and self.head_lr > 0):
            raise FedLoraError(f"--lr and --head-lr must be positive, got {self.lr} and {self.head_lr}")
        if not (self.logit_adjust >= 0 and self.label_prior_noise > 0):
            raise FedLoraError(f"--logit-adjust must be 0 or positive and --label-prior-noise positive, got "
                               f"{self.logit_adjust} and {self.label_prior_noise}")
        if not (self.center_noise >= 0 and self.center_noise < float("inf")):
            raise FedLoraError(f"--center-noise must be 0 (off) or a positive noise std, got {self.center_noise}")
        if not 0 <= self.release_average < 1:
            raise FedLoraError(f"--release-average must be in [0, 1), got {self.release_average}")
        if not self.max_grad_norm > 0:
            raise FedLoraError(f"--max-grad-norm must be positive, got {self.max_grad_norm}")
        if self.max_length < 0 or self.max_length_cap < 8:
            raise FedLoraError("--max-length must be 0 (from the data) or positive, --max-length-cap at least 8")
        if self.batch_size < 1:
            raise FedLoraError("--batch-size must be at least 1")
        if self.secagg_max_weight < 1 or self.secagg_timeout < 0:
            raise FedLoraError("--secagg-max-weight must be at least 1 and --secagg-timeout 0 (automatic) or positive")
        if self.device not in ("auto", "cpu", "cuda"):
            raise FedLoraError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if not 0 <= self.client_gpus <= 1:
            raise FedLoraError(f"--client-gpus must be in [0, 1] (a share of one GPU), got {self.client_gpus}")
        if self.workers < 0 or not self.client_cpus >= 0:
            raise FedLoraError("--workers and --client-cpus must be 0 (automatic) or positive")
        if self.workers and self.ray_address:
            raise FedLoraError("--workers sizes a private Ray instance; on a Ray cluster (--ray-address) its CPUs and --client-cpus decide")
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

    @property
    def stage_timeout(self) -> float:
        """Seconds a secure-aggregation stage waits: --secagg-timeout, or 300 in deployment,
        where owners train in parallel and a silent one has gone. A simulation sets its
        own before it starts (`simulations/run.py::for_simulation`)."""
        return self.secagg_timeout or DEPLOYMENT_STAGE_TIMEOUT

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


# Flag help for the DP-recipe fields, kept off their lines while the recipe's defaults are
# being retuned (issue 9); `flag_help` reads a field's own metadata first.


def flag_help(f: dataclasses.Field, default: Any = dataclasses.MISSING) -> str:
    """The CLI help of a FedConfig field (argparse %-formatting: a literal percent is %%);
    `default` is shown instead of the field's where a command has its own."""
    shown = f.default if default is dataclasses.MISSING else default
    text = f.metadata.get("help")
    if not text:
        return f"default: {shown}"
    return text if "default" in text else f"{text} (default: {shown})"


def _coerce(name: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise FedLoraError(f"config value {name}={value!r} is not a valid {kind.__name__}") from exc
