"""`fedlora simulate`: many virtual clients on one machine with Flower's simulation engine (Ray)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from client.client_app import app as default_client_app
from shared.config import FedConfig
from shared.secagg.identity import ENV_SIM_DIR, make_simulation_keys
from client.privacy import PrivacyPlan, plan_privacy
from client.trainer import release_memory
from shared.data import choose_max_length, client_partition, load_federation, partitioning
from shared.errors import FedLoraError
from shared.quiet import offline_and_quiet
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
    owners = length_sample(parts.sizes, cfg.seed)
    lengths = [choose_max_length(client_partition(cfg, pid), tokenizer, cfg, model) for pid in owners]
    how = "--max-length" if cfg.max_length else f"95th percentile of each owner's token counts, cap {cfg.max_length_cap}"
    if len(owners) < len(parts.kept):
        how += f"; {len(owners)} owners sampled, each client measures its own"
    console.print(f"{len(parts.kept)} owners, {min(parts.sizes)} to {max(parts.sizes)} rows; "
                  f"max length {min(lengths)}-{max(lengths)} tokens ({how})")
    if cfg.dp:
        refused, small = [], []
        plans: dict[int, PrivacyPlan | FedLoraError] = {}  # the plan depends on the size alone
        for name, size in zip(parts.names, parts.sizes):
            if size not in plans:
                try:
                    plans[size] = plan_privacy(cfg, size)
                except FedLoraError as exc:
                    plans[size] = exc
            plan = plans[size]
            if isinstance(plan, FedLoraError):
                refused.append((name, str(plan)))
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


LENGTH_SAMPLE = 64


def length_sample(sizes: list[int], seed: int) -> list[int]:
    """The owners whose token lengths the preflight reports: all of them up to LENGTH_SAMPLE,
    else the smallest, the largest and a seeded random rest (tokenizing 10,000 owners one by
    one took two minutes; each client measures its own data anyway)."""
    if len(sizes) <= LENGTH_SAMPLE:
        return list(range(len(sizes)))
    ends = {int(np.argmin(sizes)), int(np.argmax(sizes))}
    rest = np.random.default_rng(seed).choice(len(sizes), LENGTH_SAMPLE, replace=False).tolist()
    return sorted(ends | set(rest[: LENGTH_SAMPLE - len(ends)]))


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
    release_memory()  # the preflight read every owner's rows once; their freed heap goes back
    cfg = with_worker_cpus(cfg, num_nodes)
    report = run_flower(cfg, num_nodes, lambda grid: run_server(grid, cfg, console), verbose)
    if cfg.output:
        report.add_training_losses(Path(cfg.output) / "ledgers")
    if cfg.local_baseline:
        add_local_baselines(report, cfg, console)
    return report.summary()


def ray_backend_config(cfg: FedConfig, verbose: bool = False) -> dict:
    """Flower's Ray backend settings. Flower makes as many workers (ClientAppActors) as
    `client_resources` fit in each Ray node; every worker loads the model once and serves
    the virtual clients it is handed one after another.

    Without --ray-address the run starts its own Ray instance (address "local"), sized to
    --workers when given; it never attaches to a cluster someone else started on this
    machine (Ray's default for a bare `ray.init()`). With --ray-address, `attach_ray`
    connects before Flower would start one (Flower only starts Ray when none is connected)."""
    init_args = {"log_to_driver": verbose, "include_dashboard": False, "logging_level": "error"}
    if not cfg.ray_address:
        init_args["address"] = "local"
        if cfg.workers:
            init_args["num_cpus"] = cfg.workers * worker_cpus(cfg)
    return {
        "client_resources": {"num_cpus": worker_cpus(cfg), "num_gpus": gpu_share(cfg)},
        "init_args": init_args,
    }


CUDA_CONTEXT_BYTES = 600 * 2**20
"""What a process pays on a GPU before its first tensor (CUDA context, kernels, allocator)."""


def workers_per_gpu(model_bytes: int, free_bytes: int, cpu_slots: int) -> int:
    """How many workers share one GPU: as many as its free memory holds (each a CUDA context,
    the frozen model, and three times the model again for activations, per-sample gradients
    and the optimizer's state, a margin that covers MiniLM to SmolLM2 at the default batch),
    and no more than the CPUs can feed, at least one."""
    fit = int(0.9 * free_bytes // (CUDA_CONTEXT_BYTES + 4 * model_bytes))
    return max(1, min(fit, cpu_slots))


def worker_slots(cfg: FedConfig) -> int:
    """Ray workers this machine runs: --workers, or as many as --client-cpus fits in its CPUs
    (Ray's own count; a private instance gets workers x client_cpus CPUs)."""
    return cfg.workers or max(1, int((os.cpu_count() or 1) // worker_cpus(cfg)))


def worker_cpus(cfg: FedConfig) -> float:
    """CPUs Ray reserves per worker: --client-cpus, or one where the automatic count (0) has
    not been resolved by `with_worker_cpus`."""
    return cfg.client_cpus or 1.0


def with_worker_cpus(cfg: FedConfig, num_nodes: int) -> FedConfig:
    """--client-cpus 0 (automatic): one CPU per worker, or, when a round has fewer clients
    than this machine has cores, the cores shared among those clients' workers.

    A worker serves one client at a time, so with one CPU each a 1-owner run (the
    centralized reference) trained on one core of two while the other idled, and a
    6-owner federation used 6 of 16 cores. The count is decided here, before the run,
    and shipped in the run config, so each worker's torch threads match Ray's
    reservation. On a Ray cluster or with --workers the reservation stays one CPU."""
    if cfg.client_cpus:
        return cfg
    per_round = max(1, int(num_nodes * cfg.fraction))  # Flower's FedAvg sample size
    cpus = os.cpu_count() or 1
    share = 1 if cfg.workers or cfg.ray_address else max(1, cpus // min(per_round, cpus))
    return cfg.replace(client_cpus=float(share))


def gpu_share(cfg: FedConfig) -> float:
    """Each Ray worker's share of a GPU: --client-gpus, or, when the models train on a GPU,
    one over `workers_per_gpu` of this machine's first GPU; 0 on the CPU."""
    import torch

    from shared.lora import resolve_device

    if cfg.client_gpus or resolve_device(cfg.device).type != "cuda":
        return cfg.client_gpus
    model = cached_model(cfg, len(load_federation(cfg).labels))[0]  # preflight's model, cached
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info()
    return 1.0 / workers_per_gpu(model_bytes, free, worker_slots(cfg))


FORWARDED_ENV_PREFIXES = ("FEDLORA_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_", "MKL_", "MALLOC_")
FORWARDED_ENV = ("PYTHONWARNINGS", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "RAY_DEDUP_LOGS")


def attach_ray(address: str, verbose: bool = False) -> None:
    """Connect this process to a running Ray cluster. Its workers were started by
    `ray start`, not by this process, so they do not inherit its environment: the run's
    settings that live there (the secure-aggregation key folder, the model cache, quiet
    logs) and this process's import path travel in the job's runtime environment."""
    import sys

    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV}
    env["PYTHONPATH"] = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=verbose,
                 logging_level="info" if verbose else "error")
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise FedLoraError(f"--ray-address {address}: cannot attach to a Ray cluster there ({exc})") from None


def run_flower(cfg: FedConfig, num_nodes: int, server_main, verbose: bool = False, client_app=None):
    """Run `server_main(grid)` as the ServerApp against `num_nodes` virtual clients in
    Flower's simulation engine and return what it returned; an exception in it is
    re-raised here, not lost in Flower's thread. Shared by training and segmentation.
    `client_app` replaces fedlora's ClientApp (tests wrap it to look inside a worker)."""
    from flwr.simulation import run_simulation

    from simulations import fast_dispatch

    fast_dispatch.install()  # one scan per dispatch pass, not one per virtual client
    results, failures = [], []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        fast_dispatch.prompt(grid)
        try:
            results.append(server_main(grid))
        except Exception as exc:  # re-raised in the caller's thread, not lost in Flower's
            failures.append(exc)
            raise

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray starts its workers at nice 15: on a shared machine any other job then takes the CPU
    # from the clients' training while the server (this process, nice 0) waits for it.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    offline_and_quiet(verbose)
    backend_config = ray_backend_config(cfg, verbose)
    # One signing key per virtual client; their public keys are the registered roster. The
    # folder is named in the environment (Ray workers inherit it) for this run only. On a
    # Ray cluster it lies under --output, which the workers on other machines must see at
    # the same path (as they must --data and the ledgers there).
    previous = os.environ.get(ENV_SIM_DIR)
    key_dir = None
    if cfg.secure_agg:
        where = None
        if cfg.ray_address and cfg.output:
            Path(cfg.output).mkdir(parents=True, exist_ok=True)
            where = cfg.output
        key_dir = tempfile.mkdtemp(prefix=".fedlora-secagg-", dir=where)
        make_simulation_keys(Path(key_dir), [f"partition-{pid}" for pid in range(num_nodes)])
        os.environ[ENV_SIM_DIR] = key_dir
    try:
        if cfg.ray_address:
            attach_ray(cfg.ray_address, verbose)
        run_simulation(
            server_app=server_app, client_app=client_app or default_client_app,
            num_supernodes=num_nodes, backend_config=backend_config, verbose_logging=verbose,
        )
    finally:
        if cfg.ray_address:
            import ray

            if ray.is_initialized():  # Flower disconnects at the end of a run; not after a failed start
                ray.shutdown()
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
    task, metric = report.task, report.task.headline
    for name, entry in local_only(cfg, console).items():
        owner = report.owners.setdefault(name, {})
        owner.update(entry)
        owner.setdefault("federated", final)  # test rows not split by owner: the whole test set
        if owner.get("local") and owner.get("federated"):  # > 0: joining helped, whichever way the metric points
            owner["gain"] = task.gain(owner["local"][metric], owner["federated"][metric])
    report.write()
    print_owner_table(report.owners, console, task)
    pairs = [(e["local"][metric], e["federated"][metric]) for e in report.owners.values() if e.get("local") and e.get("federated")]
    if pairs:
        console.print(f"mean over {len(pairs)} owners of {metric} on their own test rows: local-only "
                      f"{sum(p[0] for p in pairs) / len(pairs):.3f}, federated {sum(p[1] for p in pairs) / len(pairs):.3f}")
