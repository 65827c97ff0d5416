"""Local-only baselines: each owner spends the same privacy budget alone, on its own data.

This is the number an owner compares with before joining a federation: the model it
could train by itself at the same (epsilon, delta), over the same rounds, through the
same training path (`client.trainer.train_local`, its own ledger and plan), scored on
the owner's own test rows when the test data names owners, else on the whole test set.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from client.privacy import PrivacyLedger, plan_privacy
from client.trainer import train_local
from shared.config import FedConfig
from shared.data import choose_max_length, client_partition, encode, load_federation, partitioning, row_owners, with_labels
from shared.errors import FedLoraError
from shared.evaluation import evaluate
from shared.frozen_prefix import training_view
from shared.lora import cached_model, load_trainable_state, model_key, release_average, trainable_state
from shared.tasks import Task, get_task


def local_only(cfg: FedConfig, console: Console | None = None) -> dict[str, dict]:
    """{owner: {"rows", "local": scores or None, "declined": reason or absent}} for every owner."""
    console = console or Console(stderr=True)
    fed = load_federation(cfg)
    cfg = with_labels(cfg, fed)  # as the server's clients get it (the probe's length reads it)
    parts = partitioning(cfg)
    model, tokenizer = cached_model(cfg, len(fed.labels))
    test = encode(fed.test, fed.labels, tokenizer, choose_max_length(fed.test, tokenizer, cfg, model), "test data",
                  task=cfg.task, model=model)
    groups = row_owners(cfg, fed.test)
    eval_module, eval_data = training_view(model, test, cfg.lora_layers, model_key(cfg))
    results: dict[str, dict] = {}
    for pid, name in enumerate(parts.names):
        frame = client_partition(cfg, pid)
        data = encode(frame, fed.labels, tokenizer, choose_max_length(frame, tokenizer, cfg, model), name,
                      task=cfg.task, model=model)
        entry: dict = {"rows": len(data)}
        load_trainable_state(model, model.fedlora_initial_state)
        ledger, plan = None, None
        if cfg.dp:
            ledger = PrivacyLedger(cfg.delta, cfg.target_epsilon)
            try:
                plan = plan_privacy(cfg, len(data))
            except FedLoraError as exc:
                results[name] = entry | {"local": None, "declined": str(exc)}
                continue
        released = None
        for server_round in range(1, cfg.rounds + 1):
            train_local(model, data, cfg, ledger, plan, server_round)
            released = release_average(released, trainable_state(model), cfg.release_average)
        load_trainable_state(model, released)  # released like the federated model
        scores = evaluate(eval_module, eval_data, len(fed.labels), groups=groups, task=get_task(cfg))
        own = scores["owners"].get(name) if groups is not None else None
        entry["local"] = own or {k: v for k, v in scores.items() if k != "owners"}
        entry["epsilon"] = ledger.epsilon() if ledger else None
        results[name] = entry
        headline = get_task(cfg).headline
        console.print(f"local-only {name}: {len(data)} rows, {headline} {entry['local'][headline]:.3f}")
    return results


def print_owner_table(owners: dict[str, dict], console: Console | None = None, task: Task | None = None) -> None:
    """Per owner: the federated model against the owner's local-only model (the task's
    headline score). The gain is positive when joining helped (`Task.gain`: for
    perplexity, lower is better), in points for scores in [0, 1], else in the score's units."""
    task = task or get_task("classify")
    metric = task.headline
    direction = "higher" if task.higher_is_better else "lower"
    table = Table(title=f"federated vs local-only, per owner ({metric} on the owner's test rows; {direction} is better)")
    for header in ("owner", "rows", "local", "federated", "gain"):
        table.add_column(header, justify="right")
    for name, entry in owners.items():
        local, fed = entry.get("local"), entry.get("federated")
        cells = [f"{x[metric]:.3f}" if x else "-" for x in (local, fed)]
        table.add_row(name[:20], str(entry.get("rows", "")), *cells, format_gain(task, local, fed))
    (console or Console()).print(table)


def format_gain(task: Task, local: dict | None, federated: dict | None) -> str:
    """The gain cell: `task.gain` of the headline, "-" when either score is missing."""
    if not local or not federated:
        return "-"
    gain = task.gain(local[task.headline], federated[task.headline])
    return f"{100 * gain:+.1f} pt" if task.headline in task.plot else f"{gain:+.3f}"
