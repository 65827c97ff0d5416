"""Global adapter checkpoints in PEFT format, one folder per round, and resuming from one."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from peft import PeftModel
from safetensors.numpy import load_file

from shared.errors import FedLoraError
from shared.lora import save_adapter, trainable_state

_ROUND_DIR = re.compile(r"round-(\d+)$")


def checkpoint_dir(output: Path, server_round: int) -> Path:
    return output / "checkpoints" / f"round-{server_round:03d}"


def save_checkpoint(model: PeftModel, output: Path, server_round: int) -> Path:
    final = checkpoint_dir(output, server_round)
    tmp = final.with_name(final.name + ".tmp")
    save_adapter(model, tmp)
    if final.exists():
        import shutil

        shutil.rmtree(final)
    tmp.rename(final)
    return final


def latest_checkpoint(path: Path) -> tuple[Path, int]:
    """Accept a round folder or a run's output folder; return (folder, round)."""
    if not path.exists():
        raise FedLoraError(f"checkpoint not found: {path}")
    match = _ROUND_DIR.search(path.name)
    if match and (path / "adapter_model.safetensors").exists():
        return path, int(match.group(1))
    rounds = sorted(
        (int(m.group(1)), p) for p in (path / "checkpoints").glob("round-*")
        if (m := _ROUND_DIR.search(p.name)) and (p / "adapter_model.safetensors").exists()
    )
    if not rounds:
        raise FedLoraError(f"no checkpoint (round-NNN/adapter_model.safetensors) under {path}")
    return rounds[-1][1], rounds[-1][0]


def load_checkpoint_state(model: PeftModel, folder: Path) -> dict[str, np.ndarray]:
    """Map a saved PEFT adapter back onto this model's trainable tensor names."""
    saved = load_file(str(folder / "adapter_model.safetensors"))
    state = {}
    for name in trainable_state(model):
        key = name.replace(".default.", ".")
        key = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        candidates = [k for k in saved if k == key or k == "base_model.model." + key]
        if not candidates:
            raise FedLoraError(f"checkpoint {folder} lacks tensor {key}: was it made with other --model/--lora settings?")
        state[name] = saved[candidates[0]]
    return state
