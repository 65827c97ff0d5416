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


def load_for_inference(checkpoint: Path, device: str | None = None, generative: bool | None = None):
    """(model on its device, tokenizer, the run's config, the checkpoint folder used).
    With `generative` set, a checkpoint of the other kind of task is refused before the
    model loads."""
    folder, _ = latest_checkpoint(Path(checkpoint))
    cfg = checkpoint_config(folder)
    _check_kind(folder, cfg, generative)
    return (*_load_model(folder, cfg, device), cfg, folder)


def _check_kind(folder: Path, cfg, generative: bool | None) -> None:
    if generative is None or get_task(cfg).generative == generative:
        return
    if generative:
        raise FedLoraError(f"{folder} is a --task {cfg.task} checkpoint: fedlora generate needs one from "
                           "--task generate (score files with fedlora predict)")
    raise FedLoraError(f"{folder} is a --task {cfg.task} checkpoint: use fedlora generate, not fedlora predict")


def _load_model(folder: Path, cfg, device: str | None):
    model, tokenizer = build_model(cfg, len(cfg.label_names))
    load_checkpoint_state(model, folder)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return model, tokenizer


def _open(checkpoint: Path, data: Path, output: Path, columns: dict[str, str] | None, generative: bool):
    """(checkpoint folder, its run's config, the file as read, its normalised rows): what
    `predict` and `generate` check before any model loads."""
    if output.suffix.lower() not in WRITERS:
        raise FedLoraError(f"--output must end in {', '.join(WRITERS)}, got {output.name!r}")
    folder, _ = latest_checkpoint(Path(checkpoint))
    cfg = checkpoint_config(folder).replace(**(columns or {}))
    _check_kind(folder, cfg, generative)
    raw = read_table(str(data))
    return folder, cfg, raw, normalize(raw, cfg, str(data), require_label=False)


def predict_file(checkpoint: Path, data: Path, output: Path, batch_size: int = 128, device: str | None = None,
                 columns: dict[str, str] | None = None) -> dict:
    """Write `data` with the task's prediction columns added to `output`; when the file has
    labels, also return the task's metrics on it (what the server's evaluation reports).
    The file, its columns and the output name are checked before the model loads."""
    output = Path(output)
    if batch_size < 1:
        raise FedLoraError("--batch-size must be at least 1")
    folder, cfg, raw, frame = _open(checkpoint, data, output, columns, generative=False)
    task = get_task(cfg)
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


def _prompt_tokens(tokenizer, prompt: str, limit: int, source: str) -> list[int]:
    from shared.tasks.generate import prompt_ids

    if not prompt.strip():
        raise FedLoraError(f"{source}: the prompt is empty")
    ids = prompt_ids(tokenizer, prompt)
    if len(ids) >= limit:
        raise FedLoraError(f"{source}: the prompt is longer than the model's context ({len(ids)} tokens, limit {limit})")
    return ids


def generate_copy(checkpoint: Path, prompt: str, max_new_tokens: int = 64, device: str | None = None,
                  stream: bool = True) -> str:
    """Copy for one prompt from a --task generate checkpoint, streamed to stdout as it is written."""
    from transformers import TextStreamer

    from shared.data import model_length_limit
    from shared.tasks.generate import generate_text

    if max_new_tokens < 1:
        raise FedLoraError("--max-new-tokens must be at least 1")
    model, tokenizer, _, _ = load_for_inference(checkpoint, device, generative=True)
    limit = model_length_limit(tokenizer, model)
    ids = _prompt_tokens(tokenizer, prompt, limit, "--prompt")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    return generate_text(model, tokenizer, prompt, min(max_new_tokens, limit - len(ids)), streamer)


def generate_file(checkpoint: Path, data: Path, output: Path | None = None, max_new_tokens: int = 64,
                  device: str | None = None, columns: dict[str, str] | None = None) -> dict:
    """Write `data` with a generated response per prompt to `output` (default: next to
    `data`, `<name>-generated.<ext>`): the run's response column, or `generated_<it>` when
    the file already has references; with references, also their perplexity under the
    model (the server's metric). Everything is checked before the model loads."""
    from shared.data import model_length_limit
    from shared.tasks.generate import generate_text

    data = Path(data)
    output = Path(output) if output else data.with_name(f"{data.stem}-generated{data.suffix}")
    if max_new_tokens < 1:
        raise FedLoraError("--max-new-tokens must be at least 1")
    folder, cfg, raw, frame = _open(checkpoint, data, output, columns, generative=True)
    model, tokenizer = _load_model(folder, cfg, device)
    limit = model_length_limit(tokenizer, model)
    lengths = [len(_prompt_tokens(tokenizer, p, limit, f"{data} row {i}")) for i, p in enumerate(frame["text"])]
    out = raw.copy()
    column = cfg.response_column if cfg.response_column not in raw.columns else f"generated_{cfg.response_column}"
    out[column] = [generate_text(model, tokenizer, p, min(max_new_tokens, limit - n)) for p, n in zip(frame["text"], lengths)]
    output.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[output.suffix.lower()](out, output)
    result = {"output": str(output), "checkpoint": str(folder), "task": cfg.task, "rows": len(out), "column": column}
    if "response" in frame.columns:
        task = get_task(cfg)
        dataset = encode(frame, [], tokenizer, choose_max_length(frame, tokenizer, cfg, model), str(data),
                         task=task, model=model)
        metrics = task.evaluate(model, dataset, 16, None)
        result["metrics"] = {k: metrics.get(k) for k in task.metrics}
    return result
