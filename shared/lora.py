"""LoRA adapters with peft: which tensors train, which travel, how they are saved.

FFA-LoRA (Sun et al., ICLR 2024): A is drawn from the run seed, identical at every
client and the server, and frozen; only B (and the task head) trains and is exchanged.
Averaging B then averages the weight updates B·A exactly, and DP noise on B is not
multiplied by a second noisy factor.
"""

from __future__ import annotations

import gc
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.config import FedConfig
from shared.errors import FedLoraError
from shared.models import load_base_model
from shared.tasks import get_task

_DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
}


def target_modules(model: PreTrainedModel, cfg: FedConfig) -> list[str] | None:
    if cfg.lora_targets:
        return [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    return _DEFAULT_TARGETS.get(model.config.model_type)


def top_layers(model: PreTrainedModel, cfg: FedConfig) -> list[int] | None:
    """Adapting only the top layers halves DP noise dimensions and backward cost alike."""
    total = model.config.num_hidden_layers
    if cfg.lora_layers <= 0 or cfg.lora_layers >= total:
        return None
    return list(range(total - cfg.lora_layers, total))


def attach_lora(model: PreTrainedModel, cfg: FedConfig) -> PeftModel:
    config = LoraConfig(
        task_type=get_task(cfg).peft_task_type,
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=target_modules(model, cfg),
        layers_to_transform=top_layers(model, cfg),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        peft_model = get_peft_model(model, config)
    if cfg.lora == "ffa":
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    for name, param in peft_model.named_parameters():
        # Opacus has no grad sampler for embeddings; a causal LM's lm_head is tied to them
        if "embeddings" in name or "embed_tokens" in name or "lm_head" in name:
            param.requires_grad_(False)
    return peft_model


def build_model(cfg: FedConfig, num_labels: int) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    base, tokenizer = load_base_model(cfg.model, num_labels, cfg.seed, get_task(cfg))
    return attach_lora(base, cfg), tokenizer


@lru_cache(maxsize=2)
def _cached(key: tuple) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Built once per process, then moved out of the cyclic garbage collector's sight
    (`gc.freeze`): a worker frees each client's tensors with a full `gc.collect()`
    (client/trainer.py::release_memory), which otherwise walked the model and every imported
    module's objects, 0.27 s a client with MiniLM, about a quarter of a 50-row client's
    training. Reference counting still frees frozen objects; `gc.unfreeze` before a new
    build lets a full collection reclaim an evicted model's cycles."""
    gc.unfreeze()
    cfg = FedConfig(**dict(key[0]))
    model, tokenizer = build_model(cfg, key[1])
    model.fedlora_initial_state = trainable_state(model)
    gc.collect()
    gc.freeze()
    return model, tokenizer


_MODEL_KEYS = ("task", "model", "lora", "lora_rank", "lora_alpha", "lora_targets", "lora_layers", "seed")


def model_key(cfg: FedConfig) -> str:
    """The settings that define the frozen weights and the adapter layout."""
    return "|".join(f"{k}={getattr(cfg, k)}" for k in _MODEL_KEYS)


def cached_model(cfg: FedConfig, num_labels: int) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """One base model per process, reused by every virtual client it serves, on `--device`.

    Safe because each round overwrites every trainable tensor from the global adapter
    before training; only the model-defining settings key the cache. The freshly
    initialised adapter stays available as `model.fedlora_initial_state`. The model
    reaches its device here, before any Opacus wrapping: moving it after Opacus has
    hooked it leaves the optimizer stepping stale tensors (opacus#820).
    """
    model, tokenizer = _cached((tuple((k, getattr(cfg, k)) for k in _MODEL_KEYS), num_labels))
    device = resolve_device(cfg.device)
    if next(model.parameters()).device != device:
        model.to(device)
    return model, tokenizer


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU Ray or the user made visible to this process, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FedLoraError("--device cuda: no CUDA GPU is visible to this process (torch.cuda.is_available() is False)")
    return torch.device("cuda", torch.cuda.current_device())


def model_loads() -> int:
    """How many models this process has built (cache misses of `cached_model`)."""
    return _cached.cache_info().misses


def trainable_state(model: PeftModel) -> dict[str, np.ndarray]:
    """Exactly the tensors that train, hence exactly the tensors that travel."""
    return {
        name: param.detach().cpu().numpy().copy()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def release_average(previous: dict[str, np.ndarray] | None, current: dict[str, np.ndarray],
                    weight: float) -> dict[str, np.ndarray]:
    """The model a run evaluates, saves and releases: an exponential average over rounds of
    the trained states, `weight` on the previous average (0: the latest state as is).

    Each round's DP aggregate carries that round's noise and the pull of the owners' label
    mixes, so the raw global swings from round to round (airline tweets, 6 owners, eps 8:
    macro-F1 0.735, 0.679, 0.700 in rounds 2-4); averaging the iterates, as De et al. (2022)
    do for DP-SGD, averages the noise away (0.710, 0.733, 0.734 with weight 0.5). It is
    post-processing of what was already released: no privacy cost. Training continues from
    the latest state, not from the average."""
    if previous is None or weight <= 0:
        return current
    return {k: (weight * previous[k] + (1 - weight) * current[k]).astype(current[k].dtype) for k in current}


def load_trainable_state(model: PeftModel, state: dict[str, np.ndarray]) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(torch.from_numpy(np.asarray(value)))


def save_adapter(model: PeftModel, directory: Path) -> None:
    """PEFT format: adapter_config.json + adapter_model.safetensors, loadable by PeftModel.from_pretrained."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
