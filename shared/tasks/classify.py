"""Sequence classification (review and support sentiment): one text in, one of N labels out."""

from __future__ import annotations

import math

import numpy as np

from shared.tasks import Task


def label_scores(y_pred: np.ndarray, y_true: np.ndarray, num_labels: int, loss: float | None = None) -> dict:
    """Accuracy beside macro-F1 and per-class recall, and the majority-class accuracy for reference:
    on skewed labels accuracy alone rewards predicting the biggest class."""
    from sklearn.metrics import f1_score, recall_score

    labels = list(range(num_labels))
    out = {
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)),
        "recall": [float(r) for r in recall_score(y_true, y_pred, average=None, labels=labels, zero_division=0)],
        "majority_accuracy": float(np.bincount(y_true, minlength=num_labels).max() / max(1, len(y_true))),
        "uniform_loss": math.log(num_labels),
    }
    if loss is not None:
        out["loss"] = loss
    return out


def scores(probs: np.ndarray, y_true: np.ndarray, num_labels: int, loss: float | None = None) -> dict:
    return label_scores(probs.argmax(-1), y_true, num_labels, loss)


def predictions(probs: np.ndarray, labels: list[str]) -> dict:
    """The predicted label, its probability, and every label's probability."""
    best = probs.argmax(-1)
    return {"predicted_label": [labels[i] for i in best], "probability": probs.max(-1),
            **{f"probability_{name}": probs[:, i] for i, name in enumerate(labels)}}


TASK = Task(
    name="classify",
    logit_adjust=True,
    head="AutoModelForSequenceClassification",
    peft_task_type="SEQ_CLS",
    columns=lambda cfg: {"text": cfg.text_column},
    scores=scores,
    predictions=predictions,
    metrics=("accuracy", "macro_f1", "loss", "majority_accuracy"),
    headline="macro_f1",
    table={"accuracy": "acc", "macro_f1": "macro-F1", "loss": "loss"},
    plot=("accuracy", "macro_f1"),
    reference="majority_accuracy",
    per_class_recall=True,
)
