"""Using a trained model: score a file with the base model plus a checkpoint's adapter.

The model is rebuilt exactly as the server built it (same task head, model, seed and
adapter layout, read from the checkpoint's `fedlora.json`) and the adapter loaded with
peft's own key mapping, so scores on the server's test file reproduce its evaluation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from server.checkpoint import checkpoint_config, latest_checkpoint, load_checkpoint_state
from shared.data import choose_max_length, encode, normalize, read_table
from shared.errors import FedLoraError
from shared.evaluation import predict
from shared.lora import build_model
from shared.tasks import get_task

WRITERS = {".csv": lambda df, p: df.to_csv(p, index=False), ".tsv": lambda df, p: df.to_csv(p, sep="\t", index=False),
           ".jsonl": lambda df, p: df.to_json(p, orient="records", lines=True),
           ".parquet": lambda df, p: df.to_parquet(p, index=False)}


def load_for_inference(checkpoint: Path, device: str | None = None):
    """(model on its device, tokenizer, the run's config, the checkpoint folder used)."""
    folder, _ = latest_checkpoint(Path(checkpoint))
    cfg = checkpoint_config(folder)
    return (*_load_model(folder, cfg, device), cfg, folder)


def _load_model(folder: Path, cfg, device: str | None):
    model, tokenizer = build_model(cfg, len(cfg.label_names))
    load_checkpoint_state(model, folder)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return model, tokenizer


def predict_file(checkpoint: Path, data: Path, output: Path, batch_size: int = 128, device: str | None = None,
                 columns: dict[str, str] | None = None) -> dict:
    """Write `data` with the task's prediction columns added to `output`; when the file has
    labels, also return the task's metrics on it (what the server's evaluation reports).
    The file, its columns and the output name are checked before the model loads."""
    output = Path(output)
    if output.suffix.lower() not in WRITERS:
        raise FedLoraError(f"--output must end in {', '.join(WRITERS)}, got {output.name!r}")
    if batch_size < 1:
        raise FedLoraError("--batch-size must be at least 1")
    folder, _ = latest_checkpoint(Path(checkpoint))
    cfg = checkpoint_config(folder).replace(**(columns or {}))
    task = get_task(cfg)
    raw = read_table(str(data))
    frame = normalize(raw, cfg, str(data), require_label=False)
    model, tokenizer = _load_model(folder, cfg, device)
    dataset = encode(frame, cfg.label_names, tokenizer, choose_max_length(frame, tokenizer, cfg, model), str(data))
    probs, y_true, loss = predict(model, dataset, batch_size)
    scored = raw.copy()
    for name, values in task.predictions(probs, cfg.label_names).items():
        scored[name] = values
    output.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[output.suffix.lower()](scored, output)
    result = {"output": str(output), "checkpoint": str(folder), "task": task.name, "rows": len(scored)}
    if "label" in frame.columns:
        metrics = task.scores(probs, y_true, len(cfg.label_names), loss)
        result["metrics"] = {k: metrics.get(k) for k in task.metrics if k in metrics}
    return result
