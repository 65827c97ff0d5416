"""Global adapter checkpoints in PEFT format, one folder per round, and resuming from one.

Each folder also holds `fedlora.json`, the run's settings (task, model, seed, adapter
layout, label set), so `fedlora predict` can rebuild the exact base model and head from
the folder alone, whether a simulation or a deployment wrote it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from shared.config import FedConfig
from shared.errors import FedLoraError
from shared.lora import save_adapter, trainable_state
from shared.tasks import get_task

_ROUND_DIR = re.compile(r"round-(\d+)$")
CONFIG_FILE = "fedlora.json"


def checkpoint_dir(output: Path, server_round: int) -> Path:
    return output / "checkpoints" / f"round-{server_round:03d}"


def save_checkpoint(model: PeftModel, output: Path, server_round: int,
                    run_config: Mapping[str, Any] | None = None) -> Path:
    final = checkpoint_dir(output, server_round)
    tmp = final.with_name(final.name + ".tmp")
    save_adapter(model, tmp)
    if run_config is not None:
        (tmp / CONFIG_FILE).write_text(json.dumps(dict(run_config), indent=2), encoding="utf-8")
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


def checkpoint_config(folder: Path) -> FedConfig:
    """The settings of the run that wrote this checkpoint folder (its `fedlora.json`, or
    the run's summary.json two folders up for checkpoints written before it existed)."""
    for path, key in ((folder / CONFIG_FILE, None), (folder.parent.parent / "summary.json", "config")):
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise FedLoraError(f"cannot read {path}: {exc}") from exc
            cfg = FedConfig.from_run_config(data[key] if key else data)
            if not cfg.label_names and not get_task(cfg).generative:
                raise FedLoraError(f"{path} does not name the run's labels")
            return cfg
    raise FedLoraError(f"{folder} has no {CONFIG_FILE} (nor a summary.json two folders up): "
                       "not a fedlora checkpoint")
