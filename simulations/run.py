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
from shared.data import client_partition, load_federation, num_partitions
from shared.lora import cached_model


def preflight(cfg: FedConfig) -> int:
    """Check everything a client would trip on, here, before Ray starts: bad files and
    columns, empty partitions, partitions too small for DP, unmeetable budgets, unknown
    models. Returns the number of virtual clients."""
    fed = load_federation(cfg)
    num_nodes = num_partitions(cfg)
    sizes = [len(client_partition(cfg, pid)) for pid in range(num_nodes)]
    if cfg.dp:
        plan_privacy(cfg, min(sizes))
    cached_model(cfg, len(fed.labels))
    return num_nodes


def simulate(cfg: FedConfig, console: Console | None = None, verbose: bool = False) -> dict:
    """Run the federation and return the summary written to `cfg.output/summary.json`."""
    from flwr.simulation import run_simulation

    from server.server_app import run_server

    console = console or Console()
    num_nodes = preflight(cfg)
    reports, failures = [], []

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            reports.append(run_server(grid, cfg, console))
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
    if not reports:
        raise RuntimeError("the simulation ended before the server finished; rerun with --verbose for Flower's logs")
    return reports[0].summary()
