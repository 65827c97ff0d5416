"""Flower ClientApp: private LoRA training on this node's data, adapters out, ledger kept.

The run settings arrive in each TRAIN message's ConfigRecord; the data location,
and in deployment the owner's own epsilon budget, come from the node config and
never leave the node.
"""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict, ArrayRecord
from flwr.clientapp import ClientApp

from logging import WARNING

from flwr.common.logger import log

from client.secagg_mod import secagg_mod
from shared.config import FedConfig
from shared.errors import FedLoraError

if TYPE_CHECKING:
    from client.privacy import PrivacyLedger

# torch, transformers, peft and opacus are imported inside `train`: in deployment every
# message starts a fresh ClientApp process, and the secure-aggregation key exchange
# stages (handled by `secagg_mod`) should not pay ~10 s of imports each.

LEDGER_KEY = "privacy-ledger"

app = ClientApp(mods=[secagg_mod])


def _node_cfg(msg: Message, context: Context) -> FedConfig:
    cfg = FedConfig.from_run_config(dict(msg.content["config"]))
    if "target-epsilon" in context.node_config:  # the owner's budget overrides the operator's
        cfg = cfg.replace(target_epsilon=float(context.node_config["target-epsilon"]))
    return cfg


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    from client.local_data import client_frame
    from client.privacy import plan_privacy
    from client.trainer import train_local
    from shared.data import choose_max_length, encode
    from shared.lora import cached_model, load_trainable_state, trainable_state
    from shared.params import from_record, record_bytes, to_record

    torch.set_num_threads(max(1, int(context.node_config.get("num-threads", 1))))
    cfg = _node_cfg(msg, context)
    server_round = int(msg.content["config"].get("server-round", 0))
    frame, source = client_frame(cfg, context.node_config)
    model, tokenizer = cached_model(cfg, len(cfg.label_names))
    dataset = encode(frame, cfg.label_names, tokenizer, choose_max_length(frame["text"], tokenizer, cfg, model), source)
    ledger = load_ledger(context, cfg)
    metrics = {"num-examples": len(dataset), "partition-id": int(context.node_config.get("partition-id", -1)),
               "delta": cfg.delta if cfg.dp else 0.0}

    try:
        plan = plan_privacy(cfg, len(dataset)) if cfg.dp else None
    except FedLoraError as exc:  # DP cannot meet this owner's budget: sit the round out, the run goes on
        log(WARNING, "fedlora: declining round %s: %s", server_round, exc)
        metrics |= {"declined": 1, "num-examples": 0, "epsilon": ledger.epsilon(), "train-loss": 0.0, "bytes-uploaded": 0}
        return Message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord(metrics)}), reply_to=msg)
    if plan is not None and not ledger.can_train(plan):
        metrics |= {"declined": 1, "num-examples": 0, "epsilon": ledger.epsilon(),
                    "epsilon-next": ledger.epsilon_after(plan), "train-loss": 0.0, "bytes-uploaded": 0}
        return Message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord(metrics)}), reply_to=msg)

    load_trainable_state(model, from_record(msg.content["arrays"]))
    result = train_local(model, dataset, cfg, ledger, plan, server_round)
    if cfg.dp:
        save_ledger(context, cfg, ledger)
    arrays = to_record(trainable_state(model))
    metrics |= {"declined": 0, "epsilon": ledger.epsilon() if cfg.dp else float("inf"),
                "train-loss": result.loss, "steps": result.steps, "bytes-uploaded": record_bytes(arrays)}
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)
