"""The one local training path, used by every task in simulation and deployment.

With DP on, a fresh Opacus engine wraps the model every round and is closed
afterwards, so hooks never stack on the cached model (opacus#608); the model is on its
device before Opacus wraps it, so the optimizer steps the tensors that train
(opacus#820). The accountant is restored from, and written back to, the client's ledger.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from client import secure_random
from client.feature_center import centred, head_layer, mean_of
from client.label_prior import label_counts, log_prior, logit_adjusted
from client.privacy import PrivacyLedger, PrivacyPlan
from shared.config import FedConfig
from shared.data import trim_batch
from shared.frozen_prefix import head_inputs, training_view
from shared.lora import model_key
from shared.tasks import Task, get_task


@dataclass
class TrainResult:
    loss: float
    steps: int


def _step(model: torch.nn.Module, batch, optimizer, task: Task, logit_offset: torch.Tensor | None = None) -> float | None:
    inputs, attention_mask, labels = batch
    optimizer.zero_grad(set_to_none=True)
    if len(labels) == 0:
        # An empty Poisson batch (likely for a small owner): no example to forward, but
        # DP-SGD still takes its step, pure noise, which the accountant has counted.
        if hasattr(optimizer, "add_noise"):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            optimizer.step()
        return None
    device = next(model.parameters()).device
    inputs, attention_mask, labels = (t.to(device) for t in trim_batch(inputs, attention_mask, labels))
    loss = task.loss(model, inputs, attention_mask, labels, logit_offset)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _mean(losses: list[float | None]) -> float:
    seen = [x for x in losses if x is not None]
    return sum(seen) / max(1, len(seen))


def _split(model: torch.nn.Module) -> tuple[list, list]:
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    return adapter, head


def round_scale(cfg: FedConfig, server_round: int) -> float:
    """Learning-rate multiplier for this round: cosine decay from 1 to 0.1 over
    --rounds when --lr-decay is cosine.

    Federated DP updates from owners with different label mixes pull the shared head
    in different directions; a step that is right in round 1 overshoots in round 6, and
    the averaged model oscillates instead of settling.
    """
    if cfg.lr_decay != "cosine" or cfg.rounds <= 1 or server_round < 1:
        return 1.0
    progress = min(1.0, (server_round - 1) / (cfg.rounds - 1))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


PROBE_LABEL_OFFSET = 6
"""Under DP the automatic probe takes C / (C + PROBE_LABEL_OFFSET) of the run for C labels: a
quarter for two labels, a third for three, over half (capped at half) for eight."""


def probe_rounds(cfg: FedConfig) -> int:
    """LP-FT: the first --head-rounds rounds train the task head alone (a linear probe on
    the frozen features); the adapters join once the head is sensible, so their early,
    noisy gradients do not chase a random head. Never more than half the rounds: a short
    run still fine-tunes. Automatic (-1): one round without DP, where a round of SGD
    converges the probe. Under DP each round's probe is noisy and the head is then frozen
    (`head_frozen`), so the probe needs the rounds it takes to converge, and that grows
    with the label count: the head has a row per label, and each label's share of an
    owner's rows (and of the clipping budget) shrinks. Replayed on frozen embeddings the
    DP probe stands within 3 points of its 8-round value after 2 rounds on the airline
    tweets (3 labels: 0.70-0.71 against 0.736), but 10 points under it on the complaint
    narratives (8 labels: 0.565 against 0.666; 0.630 after 4), and the same holds without
    any noise (0.535 after 2), so the rounds, not the noise, are short. Hence a share of
    C / (C + 6) for C labels: 2 of 8 rounds for 2 or 3 labels (synthetic 0.969, airlines
    0.755; a half-run probe leaves the synthetic set's adapters too few rounds, 0.940),
    4 of 8 for 8 labels (complaints 0.528 with 2 probe rounds, see the README). A task
    without a head (generate: the causal LM's own, frozen, vocabulary projection) has none
    and trains its adapters from round 1."""
    if get_task(cfg).generative:
        return 0
    if cfg.head_rounds >= 0:
        wanted = cfg.head_rounds
    elif not cfg.dp:
        wanted = 1
    else:
        labels = max(2, len(cfg.label_names))  # labels unknown (no data yet): the two-label share
        wanted = max(1, cfg.rounds * labels // (labels + PROBE_LABEL_OFFSET))
    return min(wanted, cfg.rounds // 2)


def head_only(cfg: FedConfig, server_round: int) -> bool:
    """A probe round (see `probe_rounds`): the head trains, the adapters are paused."""
    return 0 < server_round <= probe_rounds(cfg)


def head_frozen(cfg: FedConfig, server_round: int) -> bool:
    """Under DP, after the linear-probe rounds the head stays as probed and only B trains.

    A head that keeps training under DP takes half of every example's clipping budget and
    walks with its own noise at SGD's per-unit rate, so the model drifts from the probe it
    started at (airline tweets, one owner of 11,710 rows: training loss 0.65 in round 1 to
    1.07 in round 8). Frozen, it leaves the whole budget to B, whose features then adapt to
    a fixed, sensible classifier. Without DP there is neither budget nor noise to save, and
    without probe rounds the head is still random, so both train as before."""
    probed = probe_rounds(cfg)
    return cfg.freeze_head and cfg.dp and 0 < probed < server_round


ADAM_REFERENCE_STEPS = 8
"""Local steps per round at which --lr applies as given to Adam under DP (see adam_step_scale)."""


def adam_step_scale(cfg: FedConfig, steps: float | None) -> float:
    """Adam's rate is a budget per round, spread over the round's local steps.

    Adam moves every coordinate by about its rate at each step, whether that coordinate
    holds signal or only DP noise, so a round of T steps moves B about T times the rate:
    an owner with 24 steps a round (3,000 rows at batch 128) overshoots where one with 6
    settles, and its noise-only coordinates drift the most. Scaling the rate by
    ADAM_REFERENCE_STEPS / T (never up) keeps every owner's movement per round at that of
    an 8-step round, so large owners add less noise, not more drift. Non-private runs
    follow the same budget: one owner holding a pooled data set takes 90 steps a round,
    and at the unscaled rate its adapters overfit from round 4 on (airline tweets).
    """
    if not steps or steps <= ADAM_REFERENCE_STEPS:
        return 1.0
    return ADAM_REFERENCE_STEPS / steps


def parameter_groups(model: torch.nn.Module, cfg: FedConfig, server_round: int = 0,
                     steps: float | None = None) -> list[dict]:
    """The LoRA B matrices and the task head learn at their own rates (and, by default,
    with their own algorithm).

    The head's per-example gradients are ~20x larger than B's. The head follows SGD with
    momentum, whose rate under DP is per unit of clipped gradient (divided by the
    clipping norm), so --max-grad-norm changes how much is clipped, not how far a step
    goes. B's signal is weak next to the noise, so it follows Adam (per-coordinate steps),
    at a rate per round (`adam_step_scale`; `steps` is the round's expected local steps).
    """
    adapter, head = _split(model)
    head_algo = "adam" if cfg.optimizer == "adam" else "sgd"
    adapter_algo = "sgd" if cfg.optimizer == "sgd" else "adam"

    def rate(lr: float, algo: str) -> float:
        lr *= round_scale(cfg, server_round)
        if algo == "adam":
            return lr * adam_step_scale(cfg, steps)
        return lr / cfg.max_grad_norm if cfg.dp else lr

    groups = ({"params": adapter, "lr": rate(cfg.lr, adapter_algo), "algo": adapter_algo},
              {"params": head, "lr": rate(cfg.head_lr, head_algo), "algo": head_algo})
    return [g for g in groups if g["params"]]


class GroupOptimizer(torch.optim.Optimizer):
    """SGD with momentum for some parameter groups, Adam for others, as one optimizer
    (Opacus wraps a single optimizer; each group's "algo" picks its update)."""

    def __init__(self, groups: list[dict], momentum: float = 0.9, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(groups, {"momentum": momentum, "betas": betas, "eps": eps, "algo": "sgd"})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["algo"] == "sgd":
                    buf = state.setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    p.add_(buf, alpha=-group["lr"])
                    continue
                state["step"] = state.get("step", 0) + 1
                m = state.setdefault("exp_avg", torch.zeros_like(p))
                v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
                b1, b2 = group["betas"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v / (1 - b2 ** state["step"])).sqrt_().add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - b1 ** state["step"]))
        return loss


def make_optimizer(model: torch.nn.Module, cfg: FedConfig, server_round: int = 0,
                   steps: float | None = None) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg, server_round, steps)
    return torch.optim.Adam(groups) if cfg.optimizer == "adam" else GroupOptimizer(groups)


def clip_norms(optimizer: torch.optim.Optimizer, cfg: FedConfig) -> float | list[float]:
    """Per-example clipping: one norm for all tensors ("flat"), or ("split") half the
    squared budget for the head and half for the adapter, spread over their tensors.

    Under flat clipping the head's large gradients take nearly all of the budget and
    B's signal drowns in noise of the same size; the split gives each its own share
    while the total sensitivity, hence the noise and the accounting, stay the same.
    """
    if cfg.clipping == "flat" or len(optimizer.param_groups) < 2:
        return cfg.max_grad_norm
    norms = []
    for group in optimizer.param_groups:
        share = cfg.max_grad_norm / math.sqrt(len(optimizer.param_groups) * len(group["params"]))
        norms += [share] * len(group["params"])
    return norms


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def release_memory() -> bool:
    """Give the round's freed activations back to the system; True when glibc did.

    A simulation worker trains one virtual client after another. glibc keeps the memory
    of freed activation tensors (hundreds of MB a step at batch 128) in its heap for
    reuse, fragmented, so the worker's RSS only grows: MiniLM with DP at batch 128 and 64
    tokens held 2.7 GB after round 3 on 1,000 airline rows, 0.68 GB with a trim after each
    round (0.25x; `python -m simulations.bench_memory`), at no measurable cost in time.
    The peak within a round stays near the fragmented heap's (0.83x); a fixed
    MALLOC_MMAP_THRESHOLD_=65536 in the environment halves it (0.49x) but cost ~25% time.
    """
    gc.collect()
    arrow = sys.modules.get("pyarrow")
    if arrow is not None:  # Arrow's allocator (mimalloc) keeps the freed buffers of the rows read: 114 MB
        arrow.default_memory_pool().release_unused()  # after loading 500,000 synthetic rows
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


def train_local(
    model: torch.nn.Module,
    dataset: TensorDataset,
    cfg: FedConfig,
    ledger: PrivacyLedger | None = None,
    plan: PrivacyPlan | None = None,
    server_round: int = 0,
) -> TrainResult:
    # cfg.seed reproduces non-private runs; under DP no draw may be predictable from the
    # server's config: noise and Poisson batches come from client/secure_random.py
    torch.manual_seed(secure_random.secret_seed() if cfg.dp else cfg.seed * 100_003 + server_round)
    adapter, head = _split(model)
    paused = adapter if head_only(cfg, server_round) else head if head_frozen(cfg, server_round) else []
    for p in paused:  # not stepped, no per-example gradient, no share of the clipping norm
        p.requires_grad_(False)
    try:
        return _train(model, dataset, cfg, ledger, plan, server_round)
    finally:
        for p in paused:
            p.requires_grad_(True)
        release_memory()


def logit_offset(model, dataset: TensorDataset, cfg: FedConfig, ledger: PrivacyLedger | None,
                 plan: PrivacyPlan | None) -> torch.Tensor | None:
    """tau * log(label prior) for the logit-adjusted loss, or None where it is off. Under DP
    the prior comes from the ledger's noisy counts (released and accounted once, see
    client/label_prior.py), and only where the plan made room for the release; without DP
    from the exact counts."""
    if not logit_adjusted(cfg):
        return None
    labels, num_labels = dataset.tensors[-1], int(model.config.num_labels)
    if cfg.dp:
        if plan is None or ledger is None or not plan.prior_noise:
            return None
        counts, smoothing = ledger.label_prior(labels, num_labels, plan.prior_noise), plan.prior_noise
        if counts is None:  # the ledger's counts are for another label set
            return None
    else:
        counts, smoothing = label_counts(labels, num_labels).tolist(), 1.0
    return cfg.logit_adjust * log_prior(counts, smoothing)


def feature_centring(model, dataset: TensorDataset, cfg: FedConfig, ledger: PrivacyLedger,
                     plan: PrivacyPlan, server_round: int):
    """A probe round's centring of the head at the owner's DP mean feature (see
    client/feature_center.py), or a null context where it is off or does not apply."""
    head = head_layer(model) if plan.center_noise and head_only(cfg, server_round) else None
    if head is None:
        return nullcontext()
    released = ledger.feature_center(lambda: head_inputs(model, head, dataset), plan.center_noise)
    mu = mean_of(released, head.in_features)
    return nullcontext() if mu is None else centred(head, mu)


def _train(model, dataset, cfg, ledger, plan, server_round) -> TrainResult:
    task = get_task(cfg)
    offset = logit_offset(model, dataset, cfg, ledger, plan)  # before the engine copies the ledger's history
    full_model = model
    model, dataset = training_view(full_model, dataset, cfg.lora_layers, model_key(cfg),
                                   cfg.cached_probe and head_only(cfg, server_round))
    model.train()
    batch_size = plan.batch_size if plan is not None else cfg.batch_size
    optimizer = make_optimizer(model, cfg, server_round, steps=cfg.local_epochs * len(dataset) / batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    if not cfg.dp:
        losses = [_step(model, batch, optimizer, task, offset) for _ in range(cfg.local_epochs) for batch in loader]
        full_model.eval()
        return TrainResult(_mean(losses), len(losses))

    assert ledger is not None and plan is not None
    with feature_centring(model, dataset, cfg, ledger, plan, server_round):  # before the engine copies the history
        losses = _train_private(model, dataset, cfg, ledger, plan, server_round, optimizer, loader, task, offset)
    full_model.eval()
    return TrainResult(_mean(losses), len(losses))


def _train_private(model, dataset, cfg, ledger, plan, server_round, optimizer, loader, task, offset) -> list:
    norms = clip_norms(optimizer, cfg)
    engine = secure_random.privacy_engine(accountant="rdp")
    engine.accountant.load_state_dict(ledger.accountant().state_dict())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Using a non-full backward hook.*")
        dp_model, dp_optimizer, dp_loader = secure_random.make_private(  # Poisson sampling, CSPRNG
            engine, module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=plan.noise_multiplier, max_grad_norm=norms,
            clipping="per_layer" if isinstance(norms, list) else "flat",
        )
    losses = []
    try:
        with warnings.catch_warnings():  # the top module's input is a cached feature, not a parameter
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            for _ in range(cfg.local_epochs):
                for batch in dp_loader:
                    losses.append(_step(dp_model, batch, dp_optimizer, task, offset))
    finally:
        dp_model._close()  # remove hooks and per-sample grads from the shared model
    ledger.record(engine.accountant, server_round)
    return losses
