"""Held-out evaluation, shared by the server, the local-only baselines, `fedlora predict` and
the tests that reproduce it. The task decides the metrics; the forward pass is one."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from shared.data import trim_padding
from shared.tasks import Task, get_task
from shared.tasks.classify import label_scores as scores  # noqa: F401 (label metrics, for callers with predictions)


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray, float]:
    """(class probabilities, true labels, mean loss) over a dataset; the loss is NaN
    when the rows have no labels (label -1)."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, probs, gold = 0.0, [], []
    for inputs, attention_mask, labels in DataLoader(dataset, batch_size=batch_size):
        inputs, attention_mask = trim_padding(inputs, attention_mask)
        labelled = bool((labels >= 0).all())
        out = model(inputs.to(device), attention_mask=attention_mask.to(device),
                    labels=labels.to(device) if labelled else None)
        total_loss += float(out.loss) * len(labels) if labelled else float("nan")
        probs.append(torch.softmax(out.logits.float(), -1).cpu())
        gold.append(labels)
    return torch.cat(probs).numpy(), torch.cat(gold).numpy(), total_loss / max(1, len(dataset))


def evaluate(model: torch.nn.Module, dataset: TensorDataset, num_labels: int, batch_size: int = 128,
             groups: np.ndarray | None = None, task: Task | str = "classify") -> dict:
    """The task's scores on the whole dataset; with `groups` (an owner name per row) also
    per owner, under "owners"."""
    task = get_task(task) if isinstance(task, str) else task
    if task.evaluate is not None:  # a generative task scores its own outputs (response perplexity)
        return task.evaluate(model, dataset, min(batch_size, 32), groups)
    probs, y_true, loss = predict(model, dataset, batch_size)
    out = task.scores(probs, y_true, num_labels, loss)
    if groups is not None:
        out["owners"] = {str(g): task.scores(probs[groups == g], y_true[groups == g], num_labels)
                         for g in sorted(set(groups.tolist()))}
    return out
