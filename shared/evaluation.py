"""Held-out evaluation, shared by the server, the local-only baselines and the tests that reproduce it."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import f1_score, recall_score
from torch.utils.data import DataLoader, TensorDataset

from shared.data import trim_padding


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray, float]:
    """(predicted labels, true labels, mean loss) over a dataset."""
    model.eval()
    total_loss, preds, gold = 0.0, [], []
    for inputs, attention_mask, labels in DataLoader(dataset, batch_size=batch_size):
        inputs, attention_mask = trim_padding(inputs, attention_mask)
        out = model(inputs, attention_mask=attention_mask, labels=labels)
        total_loss += float(out.loss) * len(labels)
        preds.append(out.logits.argmax(-1))
        gold.append(labels)
    return torch.cat(preds).numpy(), torch.cat(gold).numpy(), total_loss / max(1, len(dataset))


def scores(y_pred: np.ndarray, y_true: np.ndarray, num_labels: int, loss: float | None = None) -> dict:
    """Accuracy beside macro-F1 and per-class recall, and the majority-class accuracy for reference:
    on skewed labels accuracy alone rewards predicting the biggest class."""
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


def evaluate(model: torch.nn.Module, dataset: TensorDataset, num_labels: int, batch_size: int = 128,
             groups: np.ndarray | None = None) -> dict:
    """Scores on the whole dataset; with `groups` (an owner name per row) also per owner, under "owners"."""
    y_pred, y_true, loss = predict(model, dataset, batch_size)
    out = scores(y_pred, y_true, num_labels, loss)
    if groups is not None:
        out["owners"] = {str(g): scores(y_pred[groups == g], y_true[groups == g], num_labels)
                         for g in sorted(set(groups.tolist()))}
    return out
