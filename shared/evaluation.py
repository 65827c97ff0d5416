"""Held-out evaluation, shared by the server, the local-only baselines, `fedlora predict` and
the tests that reproduce it. The task decides the metrics; the forward pass is one."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from shared.data import trim_padding
from shared.tasks import Task, get_task
from shared.tasks.classify import label_scores as scores  # noqa: F401 (label metrics, for callers with predictions)


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray, float]:
    """(class probabilities, true labels, mean loss) over a dataset; the loss is NaN
    when the rows have no labels (label -1)."""
    model.eval()
    device = next(model.parameters()).device
    all_inputs, all_masks, all_labels = dataset.tensors[:3]
    # Rows in order of length, so each batch is trimmed to its own longest row: a batch of
    # 128 drawn in data order nearly always holds one row at --max-length, and the forward
    # pass is paid on its padding for all 128. Outputs go back to the data's order.
    order = torch.argsort(all_masks.sum(1), stable=True)
    total_loss, probs = 0.0, torch.empty(len(order), 0)
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        inputs, attention_mask = trim_padding(all_inputs[rows], all_masks[rows])
        labels = all_labels[rows]
        labelled = bool((labels >= 0).all())
        out = model(inputs.to(device), attention_mask=attention_mask.to(device),
                    labels=labels.to(device) if labelled else None)
        total_loss += float(out.loss) * len(labels) if labelled else float("nan")
        p = torch.softmax(out.logits.float(), -1).cpu()
        if probs.shape[1] != p.shape[1]:
            probs = torch.empty(len(order), p.shape[1])
        probs[rows] = p
    return probs.numpy(), all_labels.numpy(), total_loss / max(1, len(dataset))


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
