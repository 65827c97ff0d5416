"""Run the frozen bottom of an encoder once per dataset, train only the adapted top.

With `--lora-layers K` only the top K transformer layers carry adapters; everything
below them is frozen and deterministic given the tokens, so its output is a fixed
feature of each example. Computing it once per client dataset (and once for the test
set) and training on the top K layers alone keeps results identical to the full model
(tests check the logits) while an epoch costs a fraction of the full forward and
backward pass. Opacus then wraps only the top module: the per-example gradients it
clips are exactly those of the full model's trainable tensors, which are the same
Parameter objects, so the adapter state that travels is unchanged.

Supported for BERT-family encoders (all-MiniLM-L6-v2, tiny-bert); other models use the
full model (`split_layer` returns None).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn
from torch.utils.data import TensorDataset
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import SequenceClassifierOutput

from shared.data import trim_padding

_CACHE: OrderedDict[str, TensorDataset] = OrderedDict()
CACHE_ENTRIES = 64


def _classifier_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper."""
    inner = getattr(getattr(model, "base_model", None), "model", model)
    return inner


def split_layer(model: nn.Module, lora_layers: int) -> int | None:
    """Index of the first adapted layer when the layers below it can be precomputed."""
    inner = _classifier_model(model)
    bert = getattr(inner, "bert", None)
    if bert is None or lora_layers <= 0 or getattr(inner.config, "is_decoder", False):
        return None
    total = len(bert.encoder.layer)
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


@torch.no_grad()
def _features(model: nn.Module, dataset: TensorDataset, start: int, batch_size: int = 64) -> TensorDataset:
    inner = _classifier_model(model)
    bert = inner.bert
    input_ids, attention_mask, labels = dataset.tensors
    was_training = model.training
    model.eval()
    hidden = torch.zeros(*input_ids.shape, inner.config.hidden_size)
    order = torch.argsort(attention_mask.sum(1))  # similar lengths together: less padding to compute
    layers = bert.encoder.layer
    device = next(model.parameters()).device
    try:
        bert.encoder.layer = nn.ModuleList(layers[:start])
        for chunk in order.split(batch_size):
            ids, mask = trim_padding(input_ids[chunk], attention_mask[chunk])
            out = bert(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            hidden[chunk, : ids.shape[1]] = out.cpu()  # the cache stays in host memory
    finally:
        bert.encoder.layer = layers
        model.train(was_training)
    return TensorDataset(hidden, attention_mask, labels)


def prefix_features(model: nn.Module, dataset: TensorDataset, start: int, key: str) -> TensorDataset:
    """Hidden states entering layer `start` for every example, cached per process.

    `key` names the frozen weights (model and seed); the data's own bytes complete the
    cache key, so two clients never share an entry unless their tokens are identical.
    Kept in float32 so evaluation on the cache reproduces the full model exactly.
    """
    input_ids, attention_mask, labels = dataset.tensors
    digest = hashlib.sha256()
    for t in (input_ids, attention_mask, labels):
        digest.update(t.numpy().tobytes())
    full_key = f"{key}|{start}|{digest.hexdigest()}"
    if full_key in _CACHE:
        _CACHE.move_to_end(full_key)
        return _CACHE[full_key]
    features = _features(model, dataset, start)
    _CACHE[full_key] = features
    while len(_CACHE) > CACHE_ENTRIES:
        _CACHE.popitem(last=False)
    return features


def training_view(model: nn.Module, dataset: TensorDataset, lora_layers: int, key: str) -> tuple[nn.Module, TensorDataset]:
    """(module to train or evaluate, its dataset): the top layers on cached features where
    the model allows it, else the whole model on tokens. Both are called the same way."""
    start = split_layer(model, lora_layers)
    if start is None:
        return model, dataset
    return EncoderTop(model, start), prefix_features(model, dataset, start, key)
