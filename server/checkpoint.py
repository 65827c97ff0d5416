"""Global adapter checkpoints in PEFT format, one folder per round, and resuming from one."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

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
    """Load a saved PEFT adapter into this model (peft's own key mapping) and return its tensors."""
    result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise FedLoraError(f"checkpoint {folder} does not fit this model (e.g. {result.unexpected_keys[0]}): "
                           "was it made with other --model/--lora settings?")
    return trainable_state(model)
