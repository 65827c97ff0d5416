"""An owner's side of federated k-means (`fedlora segment`), served by the same ClientApp,
secure-aggregation mod, owner policy and ledger as training.

A segment round is a TRAIN message whose content holds the `segment` ConfigRecord:

- stage `stats`: the server's centroids arrive; the owner assigns its own customers'
  embeddings, sums them per cluster with the counts (shared/segment.py), adds Gaussian noise
  drawn from its own ChaCha20 stream (client/secure_random.py, keyed from os.urandom: the
  server's seed plays no part), records the release in its ledger and replies with the noisy
  vector (masked by secagg_mod under secure aggregation). The noise multiplier comes from the
  owner's own schedule for its own budget; a release the ledger cannot afford is declined.
- stage `assign`: the final centroids arrive; the owner writes its customers' segments and a
  description of each segment to its own disk. Nothing but a status code is sent back.

The server's centroids are untrusted input: wrong shapes, non-finite values or a k larger than
the owner's rows are declined with a code, and nothing about them changes the noise.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from shared.config import FedConfig

from client.client_app import SEGMENT_RECORD  # (ConfigRecord: stage, release, releases)
CENTROIDS_RECORD = "centroids"
STATS_KEY = "stats"
MAX_K = 1024


# --- the owner's encoder and embeddings -------------------------------------------------

def _checkpoint_labels(folder: Path) -> int:
    """The number of classes of the checkpoint's task head (its last layer's rows)."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
        heads = [k for k in fh.keys() if k.endswith(("classifier.weight", "score.weight"))]
        return int(fh.get_slice(heads[0]).get_shape()[0]) if heads else 2


@lru_cache(maxsize=2)
def _encoder(model_name: str, seed: int, checkpoint: str):
    from peft import PeftModel

    from server.checkpoint import latest_checkpoint
    from shared.errors import FedLoraError
    from shared.models import load_base_model

    if not checkpoint:
        model, tokenizer = load_base_model(model_name, 2, seed)
        return model, tokenizer, f"{model_name}|base"
    folder, _ = latest_checkpoint(Path(checkpoint))
    base, tokenizer = load_base_model(model_name, _checkpoint_labels(folder), seed)
    try:
        model = PeftModel.from_pretrained(base, folder)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise FedLoraError(f"checkpoint {folder} does not fit --model {model_name}: {str(exc).splitlines()[0]}") from None
    digest = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
    return model.eval(), tokenizer, f"{model_name}|{seed}|{digest}"


def encoder(cfg: FedConfig):
    """(model, tokenizer, id): the base model, or base + the federated adapter of `--checkpoint`."""
    return _encoder(cfg.model, cfg.seed, cfg.segment_checkpoint)


def encoder_dim(cfg: FedConfig) -> int:
    model, _, _ = encoder(cfg)
    return int(model.config.hidden_size)


def embeddings(cfg: FedConfig, texts: list[str]) -> np.ndarray:
    """Normalised sentence embeddings of these texts, clipped to norm 1 (the sensitivity bound)."""
    from shared.data import choose_max_length
    from shared.segment import clip_rows, embed, embeddings_cached

    model, tokenizer, enc_id = encoder(cfg)
    length = choose_max_length(texts, tokenizer, cfg, model)
    x = embeddings_cached(f"{enc_id}|{length}", texts, lambda t: embed(model, tokenizer, t, length))
    return clip_rows(x.astype(np.float64))


def owner_frame(cfg: FedConfig, node_config) -> tuple:
    """(rows, their texts, owner name, source): the owner's own file in deployment, its
    simulated share otherwise. Rows without text are left out."""
    from shared.data import check_columns, read_table
    from shared.errors import FedLoraError
    from shared.segment import simulation_owners

    if "data-path" in node_config:
        path = str(node_config["data-path"])
        column = str(node_config.get("text-column", cfg.text_column))
        frame = read_table(path)
        check_columns(frame, path, column)
        frame = frame[frame[column].notna()].reset_index(drop=True)
        return frame, frame[column].astype(str).tolist(), "owner", path
    if "partition-id" not in node_config:
        raise FedLoraError("node config needs either 'data-path' (deployment) or 'partition-id' (simulation)")
    pid = int(node_config["partition-id"])
    names, frames, _ = simulation_owners(cfg)
    if not 0 <= pid < len(frames):
        raise FedLoraError(f"owner {pid} does not exist ({len(frames)} owners)")
    frame = frames[pid]
    return frame, frame[cfg.text_column].astype(str).tolist(), names[pid], f"owner {names[pid]}"


def owner_dir(context: Context, cfg: FedConfig, name: str) -> Path:
    """Where the owner's segments go: its own folder in deployment, `<output>/owners/<name>` in simulation."""
    if "segment-dir" in context.node_config:
        return Path(str(context.node_config["segment-dir"])).expanduser()
    if "data-path" in context.node_config:
        return Path("~/.fedlora/segments").expanduser()
    return Path(cfg.output) / "owners" / name


# --- one round ----------------------------------------------------------------------

def _centroids(msg: Message, k_max: int, dim: int) -> np.ndarray:
    from client.policy import DeclineCode, Declined

    rec = msg.content.array_records.get(CENTROIDS_RECORD)
    if rec is None or list(rec.keys()) != [CENTROIDS_RECORD]:
        raise Declined(DeclineCode.REQUEST, "segment round without centroids")
    c = rec[CENTROIDS_RECORD].numpy()
    if c.ndim != 2 or c.shape[1] != dim or not 1 <= c.shape[0] <= min(k_max, MAX_K) or not np.isfinite(c).all():
        raise Declined(DeclineCode.REQUEST, f"centroids of shape {c.shape} do not fit k <= {k_max} in dimension {dim}")
    return c.astype(np.float64)


def segment_round(msg: Message, context: Context, server_round: int) -> Message:
    """Answer a segment round: a noisy statistics release or the local assignment (see module doc)."""
    from client.client_app import _secagg_info, ledger_path, load_ledger, owner_log, save_ledger
    from client.policy import DeclineCode, Declined, OwnerPolicy, effective_config
    from client.privacy import PrivacyLedger, PrivacyPlan
    from client.secure_random import ChaChaRNG
    from shared.errors import FedLoraError
    from shared.params import record_bytes
    from shared.segment import (
        SENSITIVITY, cluster_stats, describe_segments, noise_schedule, sq_distances, write_owner_outputs,
    )

    seg = msg.content.config_records[SEGMENT_RECORD]
    try:
        request = FedConfig.from_run_config(dict(msg.content["config"]))
        stage, release, releases = str(seg["stage"]), int(seg["release"]), int(seg["releases"])
    except (FedLoraError, KeyError, TypeError, ValueError) as exc:
        raise Declined(DeclineCode.REQUEST, f"malformed segment request: {exc}") from None
    if stage not in ("stats", "assign") or not 1 <= release <= releases:
        raise Declined(DeclineCode.REQUEST, f"unknown segment stage {stage!r} or release {release} of {releases}")
    # the privacy request as the owner's policy reads it: this segmentation's budget and releases
    request = request.replace(target_epsilon=request.segment_epsilon, rounds=releases)
    cfg = effective_config(request, context.node_config)
    try:
        frame, texts, name, source = owner_frame(cfg, context.node_config)
        x = embeddings(cfg, texts)
    except FedLoraError as exc:
        raise Declined(DeclineCode.DATA, str(exc)) from None
    centroids = _centroids(msg, request.segment_k, x.shape[1])
    if len(centroids) > len(x):
        raise Declined(DeclineCode.REQUEST, f"k = {len(centroids)} is larger than this owner's {len(x)} rows")

    if stage == "assign":  # local only: nothing about the rows leaves
        dist = sq_distances(x, centroids)
        labels = dist.argmin(1)
        folder = owner_dir(context, cfg, name)
        write_owner_outputs(folder, frame, labels, dist[np.arange(len(x)), labels],
                            describe_segments(texts, x, centroids, labels))
        owner_log(context, f"fedlora client: segments of {len(x)} rows ({source}) written to {folder}")
        metrics = {"declined": 0, "declined-code": 0, "bytes-uploaded": 0}
        return Message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord(metrics)}), reply_to=msg)

    OwnerPolicy.for_node(context.node_config, request).check(request, _secagg_info(context))  # before the ledger
    stats = cluster_stats(x, centroids)
    if not cfg.dp:  # a non-private baseline the policy allowed: exact statistics
        arrays = ArrayRecord({STATS_KEY: Array(stats)})
        metrics = {"declined": 0, "declined-code": 0, "epsilon": float("inf"), "delta": 0.0,
                   "bytes-uploaded": record_bytes(arrays)}
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)
    if not cfg.delta < 1.0 / len(x):
        raise Declined(DeclineCode.REQUEST, f"--delta {cfg.delta} must be below 1/N = {1.0 / len(x):.2e} for N={len(x)} rows")
    try:
        z = noise_schedule(cfg.target_epsilon, cfg.delta, releases)[release - 1]
    except ValueError as exc:
        raise Declined(DeclineCode.REQUEST, str(exc)) from None
    plan = PrivacyPlan(noise_multiplier=z, sample_rate=1.0, steps_per_round=1, batch_size=len(x))
    path = ledger_path(context, cfg)
    try:
        with PrivacyLedger.lock(path):
            ledger = load_ledger(context, cfg)
            if not ledger.can_train(plan):
                raise Declined(DeclineCode.BUDGET, f"epsilon {ledger.epsilon():.3f} spent, this release would reach "
                               f"{ledger.epsilon_after(plan):.3f} > budget {cfg.target_epsilon}",
                               report={"epsilon": ledger.epsilon(), "delta": cfg.delta})
            noisy = stats + ChaChaRNG().gaussian_noise(z * SENSITIVITY, _as_tensor(stats)).numpy()
            accountant = ledger.accountant()
            accountant.history.append((z, 1.0, 1))
            ledger.record(accountant, server_round)
            save_ledger(context, cfg, ledger)  # recorded before anything leaves
    except FedLoraError as exc:
        raise Declined(DeclineCode.LEDGER, str(exc)) from None
    arrays = ArrayRecord({STATS_KEY: Array(np.ascontiguousarray(noisy, dtype=np.float64))})
    metrics = {"declined": 0, "declined-code": 0, "epsilon": ledger.epsilon(), "delta": cfg.delta,
               "bytes-uploaded": record_bytes(arrays)}
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


def _as_tensor(a: np.ndarray):
    import torch

    return torch.from_numpy(a)


__all__ = ["CENTROIDS_RECORD", "SEGMENT_RECORD", "STATS_KEY", "embeddings", "encoder", "encoder_dim",
           "owner_frame", "segment_round"]
