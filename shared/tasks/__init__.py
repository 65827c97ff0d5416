"""The task seam: what differs between marketing tasks, and nothing else.

One small module per task (the shape of Flower's `task.py` and peft's `TaskType`) names
the model head, the loss, the metrics, the data columns and how a row becomes model
input. The trainer, the DP wrapper, secure aggregation, checkpoints and the server's
evaluation are one code path that asks `get_task(cfg)` for these, so adding a task never
copies any of them. This module stays import-light (no torch): `FedConfig.validate`
checks task names against `TASKS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from shared.config import FedConfig

TASKS = {"classify": "shared.tasks.classify", "click": "shared.tasks.click", "generate": "shared.tasks.generate"}


@dataclass(frozen=True)
class Task:
    name: str
    head: str  # transformers auto class of the model with its task head
    peft_task_type: str  # peft TaskType: decides which head modules peft trains and saves
    columns: Callable[["FedConfig"], dict[str, str]]  # model input ("text", "text_pair") -> the file's column
    scores: Callable[..., dict]  # (class probabilities, true labels, num_labels, loss) -> metrics
    predictions: Callable[..., dict]  # (class probabilities, label names) -> columns `fedlora predict` adds
    metrics: tuple[str, ...]  # per-round metrics in metrics.csv and summary.json
    headline: str  # the one score owners compare (progress line, federated vs local-only)
    table: dict[str, str] = field(default_factory=dict)  # metric -> column header in the final table
    plot: tuple[str, ...] = ()  # metrics drawn against epsilon (all in [0, 1])
    reference: str = ""  # a trivial predictor's score, drawn as a dotted line
    labels: tuple[str, ...] | None = None  # a fixed label set; None: from the data or --labels
    per_class_recall: bool = False  # scores carry "recall" per label (table note, metrics.csv columns)
    # FedConfig settings this task starts from when their flag is not given (the CLI's
    # `simulate` and `server`; the server's run config carries them to every client).
    # "model" is the task's default model; DP settings belong here when the task's
    # gradients differ in kind from a classifier's (see shared/tasks/generate.py).
    defaults: dict[str, Any] = field(default_factory=dict)
    # A generative task (a causal LM, `generate`) has no label set: its target is a text
    # column (normalized to "response"), labels are per token, and it brings its own
    # collate step, length count, evaluation and after-run samples; None: the shared ones.
    generative: bool = False
    target: Callable[["FedConfig"], str] | None = None  # the column with the target text (generative tasks)
    encode: Callable[..., Any] | None = None  # (frame, tokenizer, max_length, source, limit) -> TensorDataset
    token_counts: Callable[..., Any] | None = None  # (frame, tokenizer) -> tokens per row, for --max-length 0
    evaluate: Callable[..., dict] | None = None  # (model, dataset, batch_size, groups) -> metrics
    after_run: Callable[..., Any] | None = None  # (model, tokenizer, test frame, output folder) after the last round
    loss_fn: Callable[..., Any] | None = None  # (model, input_ids, attention_mask, labels) -> loss; None: the head's
    higher_is_better: bool = True  # the headline's direction (perplexity: lower is better)
    # Train with the logit-adjusted loss (--logit-adjust): for tasks scored on balanced
    # decisions (macro-F1). Off where the probabilities themselves are the product (click rates).
    logit_adjust: bool = False

    @property
    def default_model(self) -> str:
        """The model when --model is not given."""
        return self.defaults.get("model", "minilm")

    def model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.head)

    def gain(self, local: float, federated: float) -> float:
        """How much better the federated model's headline score is than the owner's
        local-only one, in the headline's units: > 0 when joining helped, whichever way
        the metric points."""
        return federated - local if self.higher_is_better else local - federated

    def loss(self, model, input_ids, attention_mask, labels, logit_offset=None):
        """The head's own loss (cross-entropy over its logits; for two classes, log-loss),
        or the task's own (`loss_fn`). ``logit_offset`` (per class, the logit-adjusted
        loss: tau * log prior, see client/label_prior.py) is added to the logits first."""
        if self.loss_fn is not None:
            return self.loss_fn(model, input_ids, attention_mask, labels)
        if logit_offset is None:
            return model(input_ids, attention_mask=attention_mask, labels=labels).loss
        import torch.nn.functional as F

        logits = model(input_ids, attention_mask=attention_mask).logits
        return F.cross_entropy(logits + logit_offset.to(logits.device, logits.dtype), labels)


def with_task_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """FedConfig settings as given (field name -> value, only what was set), completed with
    the task's own defaults (`Task.defaults`) where a setting was not given. The CLI and the
    benchmarks' key=value parser both start a run's config here."""
    task = given.get("task")
    if task not in TASKS:
        return dict(given)
    return {**get_task(task).defaults, **given}


def get_task(cfg_or_name: "FedConfig | str") -> Task:
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.task
    if name not in TASKS:
        from shared.errors import FedLoraError

        raise FedLoraError(f"--task must be one of {', '.join(TASKS)}, got {name!r}")
    return import_module(TASKS[name]).TASK
