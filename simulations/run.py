"""`fedlora simulate`: many virtual clients on one machine with Flower's simulation engine (Ray)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from client.client_app import app as client_app
from shared.config import FedConfig
from shared.secagg.identity import ENV_SIM_DIR, make_simulation_keys
from client.privacy import plan_privacy
from shared.data import choose_max_length, client_partition, load_federation, partitioning
from shared.errors import FedLoraError
from shared.lora import cached_model


def preflight(cfg: FedConfig, console: Console | None = None) -> int:
    """Check everything a client would trip on, here, before Ray starts: bad files and
    columns, unmeetable budgets, unknown models; say what the data-driven choices were
    (owners left out, token length, small owners' batches). Returns the number of
    virtual clients."""
    console = console or Console(stderr=True)
    fed = load_federation(cfg)
    parts = partitioning(cfg)
    for note in parts.notes:
        console.print(f"[yellow]note:[/] {note}")
    model, tokenizer = cached_model(cfg, len(fed.labels))
    lengths = [choose_max_length(client_partition(cfg, pid), tokenizer, cfg, model) for pid in range(len(parts.kept))]
    how = "--max-length" if cfg.max_length else f"95th percentile of each owner's token counts, cap {cfg.max_length_cap}"
    console.print(f"{len(parts.kept)} owners, {min(parts.sizes)} to {max(parts.sizes)} rows; "
                  f"max length {min(lengths)}-{max(lengths)} tokens ({how})")
    if cfg.dp:
        refused, small = [], []
        for name, size in zip(parts.names, parts.sizes):
            try:
                plan = plan_privacy(cfg, size)
            except FedLoraError as exc:
                refused.append((name, str(exc)))
                continue
            if plan.batch_size < cfg.batch_size:
                small.append(f"{name} ({size} rows: batch {plan.batch_size})")
        if small:
            console.print(f"small owners train at their own sampling rate: {', '.join(small[:6])}"
                          + (f" and {len(small) - 6} more" if len(small) > 6 else ""))
        for name, reason in refused[:3]:
            console.print(f"[yellow]note:[/] owner {name} will decline every round: {reason}")
        if len(refused) == len(parts.names):
            raise FedLoraError(f"no owner can train under DP: {refused[0][1]}")
    return len(parts.kept)


SIMULATION_STAGE_TIMEOUT = 24 * 3600.0


def for_simulation(cfg: FedConfig) -> FedConfig:
    """The simulation's own stage timeout unless --secagg-timeout names one. Virtual clients
    train one after another on a few workers, so a stage lasts as long as all of their
    training (minutes per owner on a loaded CPU); a client that has not replied is still
    computing, and one whose worker dies comes back at once as an error. A deployment's
    300 s would drop the owners queued last and waste the budget they spent."""
    return cfg if cfg.secagg_timeout else cfg.replace(secagg_timeout=SIMULATION_STAGE_TIMEOUT)


def simulate(cfg: FedConfig, console: Console | None = None, verbose: bool = False) -> dict:
    """Run the federation and return the summary written to `cfg.output/summary.json`."""
    from server.server_app import run_server

    console = console or Console()
    cfg = for_simulation(cfg)
    num_nodes = preflight(cfg, console)
    report = run_flower(cfg, num_nodes, lambda grid: run_server(grid, cfg, console), verbose)
    if cfg.output:
        report.add_training_losses(Path(cfg.output) / "ledgers")
    if cfg.local_baseline:
        add_local_baselines(report, cfg, console)
    return report.summary()


def run_flower(cfg: FedConfig, num_nodes: int, server_main, verbose: bool = False):
    """Run `server_main(grid)` as the ServerApp against `num_nodes` virtual clients in
    Flower's simulation engine and return what it returned; an exception in it is
    re-raised here, not lost in Flower's thread. Shared by training and segmentation."""
    from flwr.simulation import run_simulation

    results, failures = [], []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            results.append(server_main(grid))
        except Exception as exc:  # re-raised in the caller's thread, not lost in Flower's
            failures.append(exc)
            raise

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    backend_config = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
        "init_args": {"log_to_driver": verbose, "include_dashboard": False, "logging_level": "error"},
    }
    # One signing key per virtual client; their public keys are the registered roster. The
    # folder is named in the environment (Ray workers inherit it) for this run only.
    previous = os.environ.get(ENV_SIM_DIR)
    key_dir = tempfile.mkdtemp(prefix="fedlora-secagg-") if cfg.secure_agg else None
    if key_dir:
        make_simulation_keys(Path(key_dir), [f"partition-{pid}" for pid in range(num_nodes)])
        os.environ[ENV_SIM_DIR] = key_dir
    try:
        run_simulation(
            server_app=server_app, client_app=client_app,
            num_supernodes=num_nodes, backend_config=backend_config, verbose_logging=verbose,
        )
    finally:
        if key_dir:
            if previous is None:
                os.environ.pop(ENV_SIM_DIR, None)
            else:
                os.environ[ENV_SIM_DIR] = previous
            shutil.rmtree(key_dir, ignore_errors=True)
    if failures:
        raise failures[0]
    if not results:
        raise RuntimeError("the simulation ended before the server finished; rerun with --verbose for Flower's logs")
    return results[0]


def add_local_baselines(report, cfg: FedConfig, console: Console) -> None:
    """Each owner alone at the same budget, next to the federated model's score on its rows."""
    from simulations.local_only import local_only, print_owner_table

    console.rule("local-only baselines")
    final = {k: report.rounds[-1].get(k) for k in report.task.metrics} if report.rounds else None
    for name, entry in local_only(cfg, console).items():
        owner = report.owners.setdefault(name, {})
        owner.update(entry)
        owner.setdefault("federated", final)  # test rows not split by owner: the whole test set
    report.write()
    print_owner_table(report.owners, console, report.task)
    metric = report.task.headline
    pairs = [(e["local"][metric], e["federated"][metric]) for e in report.owners.values() if e.get("local") and e.get("federated")]
    if pairs:
        console.print(f"mean over {len(pairs)} owners of {metric} on their own test rows: local-only "
                      f"{sum(p[0] for p in pairs) / len(pairs):.3f}, federated {sum(p[1] for p in pairs) / len(pairs):.3f}")
