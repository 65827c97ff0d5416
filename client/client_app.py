"""Flower ClientApp: private LoRA training on this node's data, adapters out, ledger kept.

The run settings arrive in each TRAIN message's ConfigRecord; the data location,
and in deployment the owner's own epsilon budget, come from the node config and
never leave the node.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict, ArrayRecord
from flwr.clientapp import ClientApp

from client.secagg_mod import SECAGG_ACTIVE, secagg_mod
from shared.config import FedConfig

if TYPE_CHECKING:
    from client.policy import SecAggInfo
    from client.privacy import PrivacyLedger

log = logging.getLogger("fedlora.client")

# torch, transformers, peft and opacus are imported inside `train`: under Flower's
# subprocess isolation (`fedlora client --isolation subprocess`) every message starts a
# fresh ClientApp process, and the secure-aggregation key exchange stages (handled by
# `secagg_mod`) should not pay ~10 s of imports each.

LEDGER_KEY = "privacy-ledger"
SEGMENT_RECORD = "segment"  # client/segment.py: marks a segment round
app = ClientApp(mods=[secagg_mod])


def _node_cfg(msg: Message, context: Context) -> FedConfig:
    from client.policy import effective_config

    return effective_config(FedConfig.from_run_config(dict(msg.content["config"])), context.node_config)


def ledger_path(context: Context, cfg: FedConfig) -> Path | None:
    """A file that outlives the run: the owner's own path in deployment; under the
    run's output in simulation, so a resumed simulation keeps composing epsilon."""
    if "ledger-path" in context.node_config:
        return Path(str(context.node_config["ledger-path"]))
    if "partition-id" in context.node_config and cfg.output:
        return Path(cfg.output) / "ledgers" / f"partition-{int(context.node_config['partition-id']):04d}.json"
    return None


def load_ledger(context: Context, cfg: FedConfig) -> "PrivacyLedger":
    from client.privacy import PrivacyLedger

    path = ledger_path(context, cfg)
    if path is not None and path.exists():
        return PrivacyLedger.load(path, cfg)
    if LEDGER_KEY in context.state.config_records:
        return PrivacyLedger.from_json(str(context.state.config_records[LEDGER_KEY]["json"]))
    return PrivacyLedger(cfg.delta, cfg.target_epsilon)


def save_ledger(context: Context, cfg: FedConfig, ledger: "PrivacyLedger") -> None:
    context.state.config_records[LEDGER_KEY] = ConfigRecord({"json": ledger.to_json()})
    path = ledger_path(context, cfg)
    if path is not None:
        ledger.save(path)


def _secagg_info(context: Context) -> "SecAggInfo | None":
    """Set by this node's own secure-aggregation mod while it runs training inside the
    masked collect stage; the server cannot forge it (it lives in the node's local state)."""
    from client.policy import SecAggInfo

    if SECAGG_ACTIVE not in context.state.config_records:
        return None
    rec = context.state.config_records[SECAGG_ACTIVE]
    return SecAggInfo(threshold=int(rec["t-global"]), group_size=int(rec["group-size"]))


def owner_log(context: Context, text: str, level: int = logging.WARNING) -> None:
    """Details of a decline or failure, and model loads (at INFO): the owner's console
    and, in deployment, the agent's local log file; never the reply."""
    log.log(level, text)
    path = context.node_config.get("log-path")
    if path:
        try:
            with open(str(path), "a", encoding="utf-8") as fh:
                fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
        except OSError:
            pass


def log_training(ledger: Path | None, server_round: int, result) -> None:
    """The owner's own record of its training loss, next to its ledger; under DP it never
    leaves the client (the reply carries no loss), but the owner can see it converge."""
    if ledger is None:
        return
    path = ledger.with_suffix(".train.csv")
    try:
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(("round,loss,steps\n" if new else "") + f"{server_round},{result.loss:.6f},{result.steps}\n")
    except OSError:
        pass


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round, or decline with a code. Under DP the reply carries only what the
    accounting covers: the masked/plain adapter, epsilon and delta spent, bytes uploaded,
    and `declined`/`declined-code`; no loss, no example count, no partition id, no text."""
    from client.policy import DeclineCode, Declined

    server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
    try:
        if SEGMENT_RECORD in msg.content.config_records:  # a federated k-means round (fedlora segment)
            from client.segment import segment_round

            return segment_round(msg, context, server_round)
        return _train(msg, context, server_round)
    except Declined as exc:
        code, detail, report = exc.code, str(exc), exc.report
    except Exception as exc:  # noqa: BLE001 - the server gets a code, the owner the traceback
        code, detail, report = DeclineCode.INTERNAL, traceback.format_exc().strip(), {}
    owner_log(context, f"fedlora client: round {server_round}: declined-code {int(code)} ({code.name}): {detail}")
    metrics = {"declined": 1, "declined-code": int(code), "bytes-uploaded": 0, **report}
    return Message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord(metrics)}), reply_to=msg)


def _train(msg: Message, context: Context, server_round: int) -> Message:
    import torch

    from client.local_data import client_frame
    from client.policy import DeclineCode, Declined, OwnerPolicy, check_task
    from client.privacy import PrivacyLedger, plan_privacy
    from client.trainer import train_local
    from shared.data import choose_max_length, encode
    from shared.errors import FedLoraError
    from shared.lora import cached_model, load_trainable_state, model_loads, trainable_state
    from shared.params import from_record, record_bytes, to_record

    try:
        request = FedConfig.from_run_config(dict(msg.content["config"]))
    except FedLoraError as exc:
        raise Declined(DeclineCode.REQUEST, f"malformed request: {exc}") from None
    OwnerPolicy.for_node(context.node_config, request).check(request, _secagg_info(context))  # before the ledger
    check_task(context.node_config, request)
    cfg = _node_cfg(msg, context)

    # a deployed agent sets its own threads; a simulation worker uses the CPUs Ray reserved for it
    torch.set_num_threads(max(1, int(context.node_config.get("num-threads", cfg.client_cpus or 1))))
    try:
        frame, source = client_frame(cfg, context.node_config)
        loads = model_loads()
        model, tokenizer = cached_model(cfg, len(cfg.label_names))
        if model_loads() > loads:  # the owner sees how often the agent pays a model load
            owner_log(context, f"fedlora client: round {server_round}: loaded model {cfg.model} in process "
                               f"{os.getpid()}", logging.INFO)
        dataset = encode(frame, cfg.label_names, tokenizer, choose_max_length(frame, tokenizer, cfg, model), source,
                         task=cfg.task, model=model)
    except FedLoraError as exc:
        raise Declined(DeclineCode.DATA, str(exc)) from None
    if not cfg.dp:  # a non-private baseline, allowed by the policy: report everything, as before
        load_trainable_state(model, from_record(msg.content["arrays"]))
        result = train_local(model, dataset, cfg, None, None, server_round)
        log_training(ledger_path(context, cfg), server_round, result)
        arrays = to_record(trainable_state(model))
        metrics = {"declined": 0, "declined-code": 0, "num-examples": len(dataset),
                   "partition-id": int(context.node_config.get("partition-id", -1)), "delta": 0.0,
                   "epsilon": float("inf"), "train-loss": result.loss, "steps": result.steps,
                   "bytes-uploaded": record_bytes(arrays)}
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    try:
        plan = plan_privacy(cfg, len(dataset))
    except FedLoraError as exc:
        raise Declined(DeclineCode.REQUEST, str(exc)) from None
    path = ledger_path(context, cfg)
    try:
        with PrivacyLedger.lock(path):  # one round at a time on this ledger: read, check, train, write
            ledger = load_ledger(context, cfg)
            if not ledger.can_train(plan):
                raise Declined(DeclineCode.BUDGET, f"epsilon {ledger.epsilon():.3f} spent, the next round would reach "
                               f"{ledger.epsilon_after(plan):.3f} > budget {cfg.target_epsilon}",
                               report={"epsilon": ledger.epsilon(), "delta": cfg.delta})
            load_trainable_state(model, from_record(msg.content["arrays"]))
            result = train_local(model, dataset, cfg, ledger, plan, server_round)
            save_ledger(context, cfg, ledger)
            log_training(path, server_round, result)
    except FedLoraError as exc:  # the lock, or a ledger file that is unreadable or does not add up
        raise Declined(DeclineCode.LEDGER, str(exc)) from None
    arrays = to_record(trainable_state(model))
    metrics = {"declined": 0, "declined-code": 0, "epsilon": ledger.epsilon(), "delta": cfg.delta,
               "bytes-uploaded": record_bytes(arrays)}
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)
