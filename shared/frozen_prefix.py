"""Run the frozen bottom of an encoder once per dataset, train only the adapted top.

With `--lora-layers K` only the top K transformer layers carry adapters; everything
below them is frozen and deterministic given the tokens, so its output is a fixed
feature of each example. Computing it once per client dataset (and once for the test
set) and training on the top K layers alone keeps results identical to the full model
(tests check the logits) while an epoch costs a fraction of the full forward and
backward pass. Opacus then wraps only the top module: the per-example gradients it
clips are exactly those of the full model's trainable tensors, which are the same
Parameter objects, so the adapter state that travels is unchanged.

The features are stored on the owner's disk (`$FEDLORA_CACHE/features`, memory-mapped on
use): a simulation's Ray worker serves a different set of owners each round, and an
in-process cache of 1 GB thrashed on the complaint narratives (10 owners, 2 GB of hidden
states at 128 tokens), so adapter rounds with `--lora-layers 2` still paid the frozen
layers' forward pass each round: 36 s a round for a 345-row owner against 22 s with the
features at hand (one thread).

In a probe round (LP-FT: only the task head trains) the whole encoder is frozen, so the
same holds one level up: with `--cached-probe`, `head_view` trains the head alone on each
example's pooled feature, computed once in eval mode (the encoder's dropout off, as a
linear probe on frozen embeddings is), and an epoch costs a matrix product. Off by
default: it changes what the probe sees (no dropout), and on the airline tweets each
owner's local-only model gained more from that than the federation did (README).

Supported for BERT-family encoders (all-MiniLM-L6-v2, tiny-bert) and Llama-family
decoders (smollm2-135m, tiny-llama; causal attention, so a token's hidden state below the
adapters depends only on the tokens before it); other models use the full model
(`split_layer` returns None).
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

from shared.atomic import atomic_write
from shared.cache import cache_dir
from shared.data import trim_padding

_CACHE: OrderedDict[str, TensorDataset] = OrderedDict()
CACHE_ENTRIES = 16
"""Entries this process keeps open. They are memory-mapped files of the disk store, so the
OS page cache, not the process, holds their bytes, and a Ray worker that serves a
different owner each round, or a restarted agent, finds them there."""
CACHE_BYTES = 1 << 30  # bytes of the entries kept open (computed in memory where the disk cannot take them)
DISK_BYTES = 16 << 30
"""Budget of the disk store (`$FEDLORA_CACHE/features`, the owner's own disk, like its
data); the least recently used files go first. MiniLM's hidden states at 128 tokens take
196 KB a row: 2 GB for the 10,000 complaint narratives."""
_BASE_DIGESTS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def _classifier_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper."""
    inner = getattr(getattr(model, "base_model", None), "model", model)
    return inner


DECODER_TYPES = ("llama",)
"""Decoders whose forward is embeddings, rotary positions, a causal mask and a plain stack
of layers: the split below reproduces it exactly (tests compare the logits)."""


def _decoder(inner: nn.Module) -> nn.Module | None:
    """The decoder stack of a causal LM that `DecoderTop` can split, else None."""
    decoder = getattr(inner, "model", None)
    if getattr(inner.config, "model_type", None) not in DECODER_TYPES or decoder is None:
        return None
    if not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return None
    return decoder


def _layers(inner: nn.Module) -> nn.ModuleList | None:
    bert = getattr(inner, "bert", None)
    if bert is not None and not getattr(inner.config, "is_decoder", False):
        return bert.encoder.layer
    decoder = _decoder(inner)
    return decoder.layers if decoder is not None else None


def split_layer(model: nn.Module, lora_layers: int) -> int | None:
    """Index of the first adapted layer when the layers below it can be precomputed."""
    layers = _layers(_classifier_model(model))
    if layers is None or lora_layers <= 0:
        return None
    total = len(layers)
    if lora_layers >= total:
        return None
    return total - lora_layers


class EncoderTop(nn.Module):
    """The top layers, pooler and head of a BERT classifier, fed with precomputed hidden states.

    It holds the model's own modules (adapters and head included), so training it trains
    the model; `forward(hidden, attention_mask=, labels=)` mirrors the full model's call.
    """

    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        inner = _classifier_model(model)
        self.config = inner.config
        self.layers = nn.ModuleList(inner.bert.encoder.layer[start:])
        self.pooler = inner.bert.pooler
        self.dropout = inner.dropout
        self.classifier = inner.classifier
        self.num_labels = inner.num_labels

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        hidden_states = hidden_states.float()
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
        if hasattr(self.pooler, "_mask"):  # MaskedMeanPooler reads the mask the encoder was called with
            self.pooler._mask = attention_mask
        logits = self.classifier(self.dropout(self.pooler(hidden_states)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _run_decoder(decoder: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                 layers) -> torch.Tensor:
    """`layers` of a Llama-style decoder on `hidden_states`, as its own forward runs them
    (positions 0..L-1: `encode` pads on the right)."""
    position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
    mask = create_causal_mask(config=decoder.config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                              past_key_values=None, position_ids=position_ids)
    position_embeddings = decoder.rotary_emb(hidden_states, position_ids=position_ids)
    for layer in layers:
        hidden_states = layer(hidden_states, attention_mask=mask, position_embeddings=position_embeddings,
                              position_ids=position_ids)
    return hidden_states


class DecoderTop(nn.Module):
    """The top layers, final norm and vocabulary projection of a Llama-style causal LM,
    fed with precomputed hidden states.

    Called as the decoder is (`get_decoder()(input_ids=hidden, attention_mask=)` gives the
    last hidden state, `get_output_embeddings()` the projection), so a task's loss runs on
    it unchanged; it holds the model's own modules, so training it trains the model.
    """

    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        inner = _classifier_model(model)
        decoder = _decoder(inner)
        self.config = inner.config
        self.layers = nn.ModuleList(decoder.layers[start:])
        self.norm = decoder.norm
        self.rotary_emb = decoder.rotary_emb
        self.lm_head = inner.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> BaseModelOutput:
        hidden = _run_decoder(self, input_ids.float(), attention_mask, self.layers)
        return BaseModelOutput(last_hidden_state=self.norm(hidden))


def _prefix(inner: nn.Module, ids: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    """Hidden states entering layer `start` for one batch of tokens."""
    decoder = _decoder(inner)
    if decoder is not None:
        return _run_decoder(decoder, decoder.embed_tokens(ids), mask, decoder.layers[:start])
    bert, layers = inner.bert, inner.bert.encoder.layer
    try:
        bert.encoder.layer = nn.ModuleList(layers[:start])
        return bert(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        bert.encoder.layer = layers


@torch.no_grad()
def _features(model: nn.Module, dataset: TensorDataset, start: int, batch_size: int = 64) -> TensorDataset:
    inner = _classifier_model(model)
    input_ids, attention_mask, labels = dataset.tensors
    was_training = model.training
    model.eval()
    hidden = torch.zeros(*input_ids.shape, inner.config.hidden_size)
    order = torch.argsort(attention_mask.sum(1))  # similar lengths together: less padding to compute
    device = next(model.parameters()).device
    try:
        for chunk in order.split(batch_size):
            ids, mask = trim_padding(input_ids[chunk], attention_mask[chunk])
            out = _prefix(inner, ids.to(device), mask.to(device), start)
            hidden[chunk, : ids.shape[1]] = out.float().cpu()  # the cache stays in host memory
    finally:
        model.train(was_training)
    return TensorDataset(hidden, attention_mask, labels)


def _cache_bytes() -> int:
    return sum(t.numel() * t.element_size() for entry in _CACHE.values() for t in entry.tensors)


def prefix_features(model: nn.Module, dataset: TensorDataset, start: int, key: str) -> TensorDataset:
    """Hidden states entering layer `start` for every example, cached (`_cached`).

    `key` names the model settings (model and seed) and the frozen weights' own digest
    completes it; the data's own bytes too, so two clients never share an entry unless
    their tokens are identical.
    Kept in float32 so evaluation on the cache reproduces the full model exactly.
    """
    full_key = f"{key}|{start}|{_data_digest(dataset)}"
    return _cached(full_key, model, lambda: _features(model, dataset, start))


class HeadTop(nn.Module):
    """The dropout and head of a BERT classifier, fed with pooled features as sequences of
    one token (so batches trim and collate as token batches do); holds the model's own
    head, so training it trains the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        inner = _classifier_model(model)
        self.config = inner.config
        self.dropout = inner.dropout
        self.classifier = inner.classifier
        self.num_labels = inner.num_labels

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        logits = self.classifier(self.dropout(features[:, 0].float()))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _head_module(model: nn.Module) -> nn.Module | None:
    """The classifier of a BERT-family model when it holds every trainable tensor (a probe
    round), else None."""
    inner = _classifier_model(model)
    head = getattr(inner, "classifier", None)
    if getattr(inner, "bert", None) is None or head is None or not hasattr(inner, "dropout"):
        return None
    inside = {id(p) for p in head.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return head if trainable and all(id(p) in inside for p in trainable) else None


@torch.no_grad()
def head_inputs(model: nn.Module, head: nn.Module, dataset: TensorDataset, batch_size: int = 64) -> torch.Tensor:
    """What `head` reads for every row, in row order, from one eval-mode forward pass
    (dropout off; similar lengths batched together, so less padding to compute). Works
    inside peft's ``disable_adapter()`` too: the hook sits on the module that runs."""
    input_ids, attention_mask, _ = dataset.tensors
    seen: list[torch.Tensor] = []
    order = torch.argsort(attention_mask.sum(1))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    handle = _running(model, head).register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().float().cpu()))
    try:
        for chunk in order.split(batch_size):
            ids, mask = trim_padding(input_ids[chunk], attention_mask[chunk])
            model(ids.to(device), attention_mask=mask.to(device))
    finally:
        handle.remove()
        model.train(was_training)
    rows = torch.cat(seen)
    return torch.empty_like(rows).index_copy_(0, order, rows)


def _running(model: nn.Module, head: nn.Module) -> nn.Module:
    """peft's ``modules_to_save`` wrapper holding `head` when there is one: with the
    adapters disabled it runs the original layer, not the trained copy, and both read the
    wrapper's input."""
    for module in model.modules():
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict) and any(copy is head for copy in copies.values()):
            return module
    return head


def _pooled(model: nn.Module, dataset: TensorDataset, head: nn.Module) -> TensorDataset:
    labels = dataset.tensors[-1]
    features = head_inputs(model, head, dataset).unsqueeze(1)
    return TensorDataset(features, torch.ones(len(labels), 1, dtype=dataset.tensors[1].dtype), labels)


def _adapter_digest(model: nn.Module) -> str:
    """Digest of the weights the pooled features depend on that change during a run: the
    adapters (the base weights are named by the caller's key; the head is read after)."""
    return _tensor_digest(p for name, p in model.named_parameters() if "lora_" in name)


def _tensor_digest(tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _base_digest(model: nn.Module) -> str:
    """Digest of the weights that never train (everything but the adapters and the task
    head), once per model object: it completes a disk entry's key, so features of an
    upgraded or re-initialised base model never come back from an older file."""
    digest = _BASE_DIGESTS.get(model)
    if digest is None:
        head = getattr(_classifier_model(model), "classifier", None)
        skip = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        digest = _BASE_DIGESTS[model] = _tensor_digest(
            p for name, p in model.named_parameters() if "lora_" not in name and id(p) not in skip)
    return digest


def _store() -> Path:
    return cache_dir("features")


def _load(path: Path) -> TensorDataset | None:
    """A stored entry, memory-mapped (the OS page cache holds it, not the process), or None
    where it is missing or unreadable (then it is recomputed and rewritten)."""
    try:
        tensors = torch.load(path, mmap=True, weights_only=True)
        if not (isinstance(tensors, (list, tuple)) and tensors and all(isinstance(t, torch.Tensor) for t in tensors)):
            raise ValueError("not a tuple of tensors")
    except FileNotFoundError:
        return None
    except Exception:  # a truncated or foreign file: drop it
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
        return None
    try:
        os.utime(path)  # the least recently used go first when the store is over budget
    except OSError:  # a read-only store still serves
        pass
    return TensorDataset(*tensors)


def _save(path: Path, features: TensorDataset) -> TensorDataset:
    """Write atomically (private to the owner's user, like its data), trim the store to
    DISK_BYTES, and return the memory-mapped copy so the computed one can be freed; on a
    full or read-only disk the computed copy serves this process alone."""
    try:
        atomic_write(path, lambda fh: torch.save(tuple(t.contiguous() for t in features.tensors), fh), private=True)
    except OSError:
        return features
    _trim_store(keep=path)
    return _load(path) or features


def _trim_store(keep: Path) -> None:
    files = []
    for f in _store().glob("*.pt"):
        try:
            st = f.stat()
        except OSError:  # another worker removed it
            continue
        files.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in files)
    for _, size, f in sorted(files):
        if total <= DISK_BYTES:
            break
        if f != keep:
            f.unlink(missing_ok=True)
            total -= size


def _cached(full_key: str, model: nn.Module, compute) -> TensorDataset:
    """Features by key: from this process's LRU, else from the disk store, else computed
    and stored (see CACHE_BYTES and DISK_BYTES)."""
    if full_key in _CACHE:
        _CACHE.move_to_end(full_key)
        return _CACHE[full_key]
    path = _store() / (hashlib.sha256(f"{full_key}|{_base_digest(model)}".encode()).hexdigest() + ".pt")
    features = _load(path)
    if features is None:
        features = _save(path, compute())
    _CACHE[full_key] = features
    while len(_CACHE) > 1 and (len(_CACHE) > CACHE_ENTRIES or _cache_bytes() > CACHE_BYTES):
        _CACHE.popitem(last=False)
    return features


def _data_digest(dataset: TensorDataset) -> str:
    digest = hashlib.sha256()
    for t in dataset.tensors:
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def head_view(model: nn.Module, dataset: TensorDataset, key: str) -> tuple[nn.Module, TensorDataset] | None:
    """(the head alone, each example's pooled feature as a one-token sequence), cached
    (`_cached`), where only the head of a BERT-family classifier trains; else None."""
    head = _head_module(model)
    if head is None:
        return None
    full_key = f"{key}|head|{_adapter_digest(model)}|{_data_digest(dataset)}"
    return HeadTop(model), _cached(full_key, model, lambda: _pooled(model, dataset, head))


def training_view(model: nn.Module, dataset: TensorDataset, lora_layers: int, key: str,
                  head_only: bool = False) -> tuple[nn.Module, TensorDataset]:
    """(module to train or evaluate, its dataset): in a probe round (`head_only`) the head
    on pooled features, else the top layers on cached features where the model allows it,
    else the whole model on tokens. All are called the same way."""
    if head_only and (view := head_view(model, dataset, key)) is not None:
        return view
    start = split_layer(model, lora_layers)
    if start is None:
        return model, dataset
    top = DecoderTop if _decoder(_classifier_model(model)) is not None else EncoderTop
    return top(model, start), prefix_features(model, dataset, start, key)
