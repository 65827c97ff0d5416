"""Instruction tuning of a causal LM: a prompt (segment, product, channel; or a customer's
message) in, the brand's copy (the response) out.

Each row becomes the tokenizer's chat template around a short system line, the user's
prompt and the assistant's response. The prompt part and the response part are tokenized
separately and joined, so the boundary is exact and generation continues from exactly the
tokens training saw; labels are -100 on the prompt and the padding, the token ids on the
response (its end-of-turn token included, so the model learns to stop).

The loss is each example's mean negative log-likelihood of its response tokens, averaged
over the batch: a function of one example alone, as DP-SGD's per-example clipping wants.
Logits are computed only at response positions (the vocabulary projection of every
prompt and padding position would cost more than the transformer itself on a small
model). The held-out metric is the response perplexity: exp of the token-weighted mean
NLL over every response token of the test set. The trainer, DP, secure aggregation,
checkpoints and the server's evaluation loop are the shared ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from shared.tasks import Task

SYSTEM = "You write marketing copy in the brand's voice."

GENERATE_CLIP_NORM = 0.05
"""DP clipping norm of a generative run: below every example's gradient, so each one is
clipped (normalized, as automatic clipping does; Bu et al. 2023).

The response NLL's per-example gradient on the adapter is about 0.2 in norm (smollm2-135m,
top 4 layers, rank 4: 0.18-0.26); at the classifier's norm 1.0 nothing is clipped and
DP noise of std sigma * 1.0 buries a mean gradient of 0.13. Adam's step does not depend on
the gradient's scale, so a norm below the gradients changes only the noise: 4x less of it
for the same noise multiplier and epsilon. Measured (bench_generate, epsilon 8, 2 rounds,
4 local epochs, lr 0.3): held-out perplexity 0.73x the base model's at norm 1.0, 0.44x at
0.05. The owner's policy (`--max-clip-norm`) caps the norm; a smaller one always passes."""

GENERATE_LR = 0.3
"""Adam's rate on B for a generative run (per round of 8 local steps, see
client/trainer.py:adam_step_scale), for GENERATE_LORA_LAYERS adapted layers. Measured at
norm 1.0, 4 local epochs: 0.02 -> 0.96x the base model's perplexity, 0.1 -> 0.87x, 0.3 ->
0.73x; at norm 0.05: 0.3 -> 0.44x, 1.0 -> 0.49x. The same rate on all 30 layers of
smollm2-135m diverges (2.25x after 2 rounds): adapting more layers needs a lower rate."""

GENERATE_LORA_LAYERS = 4
"""Adapters on the top 4 layers: the frozen bottom runs once per owner's data
(shared/frozen_prefix.py), so a round on a CPU costs about 0.4x the whole model's (141 s
against 360 s for the same 4 epochs), and the rate above was measured there."""
SAMPLES = 5  # test prompts whose greedy generations are written after the last round
SAMPLE_TOKENS = 48


def _messages(prompt: str, response: str | None = None) -> list[dict]:
    out = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    if response is not None:
        out.append({"role": "assistant", "content": response})
    return out


def _check_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        from shared.errors import FedLoraError

        raise FedLoraError("--task generate needs a chat model: this model's tokenizer has no chat template")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The chat-formatted prompt up to the assistant's turn, as generation starts it."""
    _check_template(tokenizer)
    text = tokenizer.apply_chat_template(_messages(prompt), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pair_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt tokens, response tokens): the response part is what the chat template adds
    after the generation prompt (the response and its end-of-turn marker)."""
    _check_template(tokenizer)
    head = tokenizer.apply_chat_template(_messages(prompt), add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(_messages(prompt, response), tokenize=False)
    if not full.startswith(head):  # a template that rewrites earlier turns: fall back to the response alone
        tail = response + (tokenizer.eos_token or "")
    else:
        tail = full[len(head):]
    return (tokenizer(head, add_special_tokens=False)["input_ids"],
            tokenizer(tail, add_special_tokens=False)["input_ids"])


def token_counts(frame, tokenizer) -> list[int]:
    """Tokens per row as training sees them (template, prompt and response)."""
    prompts = frame["text"].astype(str).tolist()
    if "response" not in frame.columns:
        return [len(prompt_ids(tokenizer, p)) for p in prompts]
    return [sum(map(len, pair_ids(tokenizer, p, r))) for p, r in zip(prompts, frame["response"].astype(str))]


def encode(frame, tokenizer, max_length: int, source: str = "data", limit: int | None = None):
    """A normalized frame ("text": prompt, "response") to (input_ids, attention_mask, labels):
    right-padded to `max_length`, labels -100 on the prompt and the padding. A prompt the
    model cannot even read (longer than its context, `limit`) is an error; a response cut
    by `max_length` keeps its first tokens."""
    import torch
    from torch.utils.data import TensorDataset

    from shared.errors import FedLoraError

    if "response" not in frame.columns:
        raise FedLoraError(f"{source} has no response column: --task generate trains and evaluates on prompt -> response pairs")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(frame)
    ids = torch.full((n, max_length), pad, dtype=torch.long)
    mask = torch.zeros((n, max_length), dtype=torch.long)
    labels = torch.full((n, max_length), -100, dtype=torch.long)
    too_long = []
    for i, (prompt, response) in enumerate(zip(frame["text"].astype(str), frame["response"].astype(str))):
        head, tail = pair_ids(tokenizer, prompt, response)
        if limit is not None and len(head) >= limit:
            too_long.append((i, len(head)))
            continue
        row = (head + tail)[:max_length]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        if len(head) < len(row):
            labels[i, len(head): len(row)] = torch.tensor(row[len(head):])
    if too_long:
        i, count = too_long[0]
        raise FedLoraError(f"{len(too_long)} prompts in {source} are longer than the model's context ({limit} tokens), "
                           f"e.g. row {i}: {count} tokens")
    return TensorDataset(ids, mask, labels)


def _causal_lm(model):
    """The transformers causal LM under the Opacus and peft wrappers (the adapters are
    injected into its layers, so calling it runs them, and Opacus's hooks see them)."""
    while hasattr(model, "_module"):
        model = model._module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def response_nll(model, input_ids, attention_mask, labels):
    """(summed NLL of each row's response tokens, its response token count)."""
    import torch
    import torch.nn.functional as F

    lm = _causal_lm(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    target = labels[:, 1:]  # position t predicts token t + 1
    keep = target != -100
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    nll = F.cross_entropy(logits, target[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    summed = torch.zeros(len(labels), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return summed, keep.sum(1)


def loss(model, input_ids, attention_mask, labels):
    summed, counts = response_nll(model, input_ids, attention_mask, labels)
    return (summed / counts.clamp(min=1)).mean()


def scores(nll: np.ndarray, counts: np.ndarray) -> dict:
    tokens = int(counts.sum())
    mean = float(nll.sum() / tokens) if tokens else float("nan")
    return {"perplexity": math.exp(mean) if tokens else float("nan"), "loss": mean, "response_tokens": tokens}


def evaluate(model, dataset, batch_size: int = 32, groups: np.ndarray | None = None) -> dict:
    """Held-out response perplexity: exp of the token-weighted mean NLL over all response
    tokens ("loss" is that mean); with `groups`, also per owner."""
    import torch
    from torch.utils.data import DataLoader

    from shared.data import trim_batch

    model.eval()
    device = next(model.parameters()).device
    nll, counts = [], []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size):
            ids, mask, labels = (t.to(device) for t in trim_batch(*batch))
            summed, count = response_nll(model, ids, mask, labels)
            nll.append(summed.double().cpu())
            counts.append(count.cpu())
    nll_np, counts_np = torch.cat(nll).numpy(), torch.cat(counts).numpy()
    out = scores(nll_np, counts_np)
    if groups is not None:
        out["owners"] = {str(g): scores(nll_np[groups == g], counts_np[groups == g]) for g in sorted(set(groups.tolist()))}
    return out


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = SAMPLE_TOKENS, streamer=None) -> str:
    """Greedy copy for one prompt (streamed to `streamer` when given)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, streamer=streamer, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def write_samples(model, tokenizer, test, output: Path, count: int = SAMPLES, max_new_tokens: int = SAMPLE_TOKENS) -> Path:
    """`generations.jsonl` in the run's folder: a few test prompts, the reference copy and
    the final model's greedy copy, for a person to read."""
    model.eval()
    path = Path(output) / "generations.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = test.head(count)
    with path.open("w", encoding="utf-8") as fh:
        for _, row in rows.iterrows():
            record = {"prompt": str(row["text"]), "reference": str(row.get("response", "")),
                      "generated": generate_text(model, tokenizer, str(row["text"]), max_new_tokens)}
            fh.write(json.dumps(record) + "\n")
    return path


TASK = Task(
    name="generate",
    head="AutoModelForCausalLM",
    peft_task_type="CAUSAL_LM",
    columns=lambda cfg: {"text": cfg.prompt_column},
    scores=lambda *args, **kwargs: {},  # unused: `evaluate` below scores generative runs
    predictions=lambda *args, **kwargs: {},
    metrics=("perplexity", "loss", "response_tokens"),
    headline="perplexity",
    higher_is_better=False,
    table={"perplexity": "perplexity", "loss": "NLL"},
    labels=(),
    defaults={"model": "smollm2-135m", "max_grad_norm": GENERATE_CLIP_NORM, "lr": GENERATE_LR,
              "lora_layers": GENERATE_LORA_LAYERS},
    generative=True,
    target=lambda cfg: cfg.response_column,
    encode=encode,
    token_counts=token_counts,
    evaluate=evaluate,
    after_run=write_samples,
    loss_fn=loss,
)
