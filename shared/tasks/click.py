"""Click prediction: a customer's profile and history paired with an offer; label 1 if they clicked.

The two texts go to the encoder as a tokenizer text pair (`[CLS] profile [SEP] offer
[SEP]`), so attention can relate what the customer bought to what is offered. The head
is the same two-class sequence classifier as `classify` (its cross-entropy is the
log-loss), so training, DP and aggregation are unchanged; the click probability is the
softmax of class 1. Marketers act on rankings, hence ROC-AUC and the click rate of the
top-scored decile beside the log-loss.
"""

from __future__ import annotations

import math

import numpy as np

from shared.tasks import Task


def scores(probs: np.ndarray, y_true: np.ndarray, num_labels: int = 2, loss: float | None = None) -> dict:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(int)
    p = np.clip(np.asarray(probs)[:, 1].astype(np.float64), 1e-7, 1 - 1e-7)
    n = len(y)
    top = np.argsort(-p, kind="stable")[: max(1, math.ceil(0.1 * n))] if n else np.array([], dtype=int)
    out = {
        "roc_auc": float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else float("nan"),
        "log_loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if n else float("nan"),
        "top_decile_click_rate": float(y[top].mean()) if n else float("nan"),
        "click_rate": float(y.mean()) if n else float("nan"),  # what a random decile would get
        "accuracy": float(((p >= 0.5) == y).mean()) if n else float("nan"),
        "uniform_loss": math.log(2),
    }
    if loss is not None:
        out["loss"] = loss
    return out


def predictions(probs: np.ndarray, labels: list[str]) -> dict:
    return {"click_probability": probs[:, 1]}


TASK = Task(
    name="click",
    head="AutoModelForSequenceClassification",
    peft_task_type="SEQ_CLS",
    columns=lambda cfg: {"text": cfg.profile_column, "text_pair": cfg.offer_column},
    scores=scores,
    predictions=predictions,
    metrics=("roc_auc", "log_loss", "top_decile_click_rate", "click_rate", "accuracy", "loss"),
    headline="roc_auc",
    table={"roc_auc": "AUC", "log_loss": "log-loss", "top_decile_click_rate": "top-10%"},
    plot=("roc_auc", "top_decile_click_rate"),
    reference="click_rate",
    labels=("0", "1"),
)
