"""Flower ServerApp: sample clients, aggregate adapters (securely by default), evaluate, checkpoint.

The same app runs under the simulation engine and the deployment runtime. The run
settings come from the Flower run config (or from `fedlora simulate`), and the server
sends the client-relevant part to the clients in every round's ConfigRecord.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from server.checkpoint import latest_checkpoint, load_checkpoint_state, save_checkpoint
from server.report import RunReport, status_line
from server.strategy import FedLoraStrategy, with_client_id
from shared.config import FedConfig
from shared.data import choose_max_length, encode, load_federation, num_partitions, row_owners, with_labels
from shared.evaluation import evaluate
from shared.frozen_prefix import training_view
from shared.lora import cached_model, load_trainable_state, model_key, release_average, trainable_state
from shared.params import from_record, to_record
from shared.tasks import get_task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, FedConfig.from_run_config(context.run_config))


def _train_round(grid: Grid, strategy: FedLoraStrategy, cfg: FedConfig, server_round: int, arrays: ArrayRecord):
    """One round of training: (new global or None, per-client metrics, failed count)."""
    if not cfg.secure_agg:
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(cfg.to_run_config()), grid))
        return strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    from server.secure_aggregation import SecAggConfig, SecureAggregation

    secure = SecureAggregation(strategy, SecAggConfig(
        threshold=cfg.secagg_threshold or None, neighbours=cfg.secagg_neighbours or None, timeout=cfg.stage_timeout,
        max_weight=cfg.secagg_max_weight, equal_weights=cfg.dp,  # under DP every owner weighs 1: W = 1, a 32-bit ring
    ))
    new_arrays, result, _ = secure.train_round(grid, server_round, arrays, ConfigRecord(cfg.to_run_config()))
    metrics = [with_client_id(m, int(m.get("node-id", -1))) for m in result.metrics]
    if result.error:
        Console(stderr=True).print(f"[yellow]round {server_round}: secure aggregation failed ({result.error}); global adapter unchanged")
    return new_arrays, metrics, len(result.dropped)


def run_server(grid: Grid, cfg: FedConfig, console: Console | None = None) -> RunReport:
    console = console or Console()
    fed = load_federation(cfg)
    cfg = with_labels(cfg, fed)
    output = Path(cfg.output)
    model, tokenizer = cached_model(cfg, len(fed.labels))
    test = encode(fed.test, fed.labels, tokenizer, choose_max_length(fed.test, tokenizer, cfg, model), "test data",
                  task=cfg.task, model=model)
    # per-owner scores when the test rows name their owner (the partition column)
    groups = row_owners(cfg, fed.test)

    start = 1
    report = RunReport(output, cfg.to_run_config(), labels=fed.labels)
    load_trainable_state(model, model.fedlora_initial_state)
    if cfg.resume:
        folder, done = latest_checkpoint(Path(cfg.resume))
        load_trainable_state(model, load_checkpoint_state(model, folder))
        report = RunReport.resume(output, cfg.to_run_config())
        report.labels = fed.labels
        report.rounds = [r for r in report.rounds if r["round"] <= done]
        start = done + 1
        console.print(f"resuming from {folder} (round {done})")
    arrays = to_record(trainable_state(model))
    released = trainable_state(model) if cfg.resume else None  # a checkpoint holds the released average
    # the frozen layers below the adapters run once over the test set, not every round
    eval_module, eval_data = training_view(model, test, cfg.lora_layers, model_key(cfg))

    strategy = FedLoraStrategy(cfg, num_partitions(cfg) if not cfg.data or cfg.partition_by else cfg.num_clients)
    columns = (TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("rounds", total=cfg.rounds, completed=start - 1, status="")
        for server_round in range(start, cfg.rounds + 1):
            t0 = time.perf_counter()
            new_arrays, metrics, failed = _train_round(grid, strategy, cfg, server_round, arrays)
            trained = time.perf_counter() - t0
            if new_arrays is not None:
                arrays = new_arrays
            released = release_average(released, from_record(arrays), cfg.release_average)
            load_trainable_state(model, released)
            evaluation = {}  # a round left out by --eval-every has no held-out scores in its row
            if server_round % cfg.eval_every == 0 or server_round == cfg.rounds:
                evaluation = evaluate(eval_module, eval_data, len(fed.labels), groups=groups, task=get_task(cfg))
            save_checkpoint(model, output, server_round, cfg.to_run_config())
            row = report.add_round(server_round, evaluation, metrics, failed, time.perf_counter() - t0, trained)
            progress.update(task, advance=1, status=status_line(get_task(cfg), row))
    if get_task(cfg).after_run is not None and start <= cfg.rounds:  # e.g. sampled generations for a person to read
        get_task(cfg).after_run(model, tokenizer, fed.test, output)
    report.write()
    report.plot()
    report.print_table(console)
    return report
