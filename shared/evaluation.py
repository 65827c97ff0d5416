"""Held-out evaluation, shared by the server and the tests that reproduce it."""

from __future__ import annotations

import torch
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader, TensorDataset

from shared.data import trim_padding


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TensorDataset, num_labels: int, batch_size: int = 128) -> dict[str, float]:
    model.eval()
    total_loss, preds, gold = 0.0, [], []
    for input_ids, attention_mask, labels in DataLoader(dataset, batch_size=batch_size):
        input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        total_loss += float(out.loss) * len(labels)
        preds.append(out.logits.argmax(-1))
        gold.append(labels)
    y_pred, y_true = torch.cat(preds).numpy(), torch.cat(gold).numpy()
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=list(range(num_labels)), zero_division=0)),
        "loss": total_loss / len(y_true),
    }
