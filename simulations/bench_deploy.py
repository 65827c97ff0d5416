"""Benchmark: a deployed round of three agents against an in-process round of the same data (issue 13).

    python -m simulations.bench_deploy [--model minilm] [--rows 300] [--rounds 3] [--modes subprocess process]

Everything runs on this machine, in one invocation. For each agent isolation mode, a real
deployment: `fedlora server` (TLS, SuperNode authentication), three `fedlora client`
agents with their own CSVs, rosters and ledgers (`--isolation subprocess`: Flower's fresh
ClientApp process per message; `--isolation process`: fedlora's long-lived one), and
`fedlora run` with DP and secure aggregation. Then the in-process baseline: the same
ServerApp code (`server.server_app.run_server`) and the same ClientApp (with its
secure-aggregation mod) exchanging the same messages through `InProcessGrid` in this
process, one client after another, with the deployed run's exact config and each owner's
node config as its agent wrote it. Round times are the server's own (`seconds` in
summary.json: training, secure aggregation, evaluation, checkpoint), so both sides time
the same span. It prints each mode's rounds as ratios to the in-process rounds, the
model loads each agent logged, and the load average; and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from simulations.local_deploy import AGENT_READY, Processes


def make_data(folder: Path, rows: int, test_rows: int, seed: int) -> list[Path]:
    from shared.data import synthetic_federation

    folder.mkdir(parents=True, exist_ok=True)
    train, test = synthetic_federation(3, rows, test_rows, seed=seed)
    owners = []
    for i, (_, part) in enumerate(train.groupby("brand"), start=1):
        owners.append(folder / f"owner{i}.csv")
        part[["text", "label"]].to_csv(owners[-1], index=False)
    test[["text", "label"]].to_csv(folder / "test.csv", index=False)
    return owners


def deployed(folder: Path, data: Path, owners: list[Path], certs: Path, mode: str, run_flags: list[str],
             timeout: float) -> dict:
    """One deployed run with agents in `mode`; the server's round times and each agent's model loads."""
    procs = Processes(folder)
    try:
        address = procs.start_server(certs, certs / "supernodes", folder / "state" / "link.db")
        for i, csv in enumerate(owners, start=1):
            procs.start_agent(f"agent{i}", address, certs, i, csv, folder / f"ledger{i}.json", folder / f"agent{i}",
                              "--isolation", mode)
        for i in range(1, len(owners) + 1):
            procs.wait_for(f"agent{i}", AGENT_READY, 120)
        out = folder / "run"
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "fedlora", "run", "--superlink", address, "--root-cert",
                              str(certs / "ca.crt"), "--test-data", str(data / "test.csv"), "--num-clients",
                              str(len(owners)), "--output", str(out), *run_flags],
                             capture_output=True, text=True, timeout=timeout, cwd=folder,
                             env=os.environ | {"HOME": str(folder / "home")})
        wall = time.perf_counter() - t0
        if run.returncode != 0:
            raise RuntimeError(f"fedlora run ({mode}) failed:\n{run.stdout[-3000:]}{run.stderr[-2000:]}")
    finally:
        procs.stop_all()
    summary = json.loads((out / "summary.json").read_text())
    loads = [(folder / f"agent{i}" / "client.log").read_text(errors="replace").count("loaded model")
             if (folder / f"agent{i}" / "client.log").exists() else 0 for i in range(1, len(owners) + 1)]
    return {"mode": mode, "rounds": [r["seconds"] for r in summary["rounds"]],
            "clients_trained": [r["clients_trained"] for r in summary["rounds"]],
            "model_loads": loads, "run_wall": round(wall, 2), "config": summary["config"]}


def in_process(folder: Path, owners: list[Path], config: dict) -> dict:
    """The same rounds in this process: run_server over InProcessGrid with each agent's node config."""
    from rich.console import Console

    from client.client_app import train
    from client.policy import OwnerPolicy
    from server.server_app import run_server
    from shared.config import FedConfig
    from simulations.bench_secagg import InProcessGrid

    folder.mkdir(parents=True, exist_ok=True)
    cfg = FedConfig.from_run_config(config).replace(output=str(folder / "run"))
    nodes = list(range(101, 101 + len(owners)))
    grid = InProcessGrid({nid: train for nid in nodes})
    for i, (nid, csv) in enumerate(zip(nodes, owners), start=1):  # what `fedlora client` writes to node-config.toml
        grid.contexts[nid].node_config.update({
            "data-path": str(csv), "text-column": "text", "label-column": "label", "profile-column": "profile",
            "offer-column": "offer", "ledger-path": str(folder / f"ledger{i}.json"), "num-threads": 1,
            "log-path": str(folder / f"client{i}.log"), **OwnerPolicy().to_node_config()})
    report = run_server(grid, cfg, Console(file=open(os.devnull, "w")))
    return {"rounds": [r["seconds"] for r in report.rounds],
            "clients_trained": [r["clients_trained"] for r in report.rounds]}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--rows", type=int, default=300, help="examples per owner")
    parser.add_argument("--test-rows", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--modes", nargs="+", default=["subprocess", "process"], choices=["subprocess", "process"])
    parser.add_argument("--folder", default=None, help="working folder (default: a new temporary one)")
    parser.add_argument("--output", default="simulations/results/bench_deploy.json")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for one deployed run")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging
    import tempfile
    import warnings

    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from shared.certs import create_certs

    folder = Path(args.folder or tempfile.mkdtemp(prefix="fedlora-bench-deploy-")).resolve()
    owners = make_data(folder / "data", args.rows, args.test_rows, seed=0)
    certs = folder / "certs"
    create_certs(certs, "localhost", len(owners))
    run_flags = ["--model", args.model, "--rounds", str(args.rounds), "--batch-size", str(args.batch_size),
                 "--max-length", str(args.max_length), "--lr", "0.005", "--secagg-neighbours", "2"]
    load = {"start": os.getloadavg()}
    results = {"model": args.model, "rows_per_owner": args.rows, "rounds": args.rounds, "cpus": os.cpu_count(),
               "deployed": {}}
    config = None
    for mode in args.modes:
        res = deployed(folder / mode, folder / "data", owners, certs, mode, run_flags, args.timeout)
        load[mode] = os.getloadavg()
        config = res.pop("config")
        results["deployed"][mode] = res
        print(f"deployed ({mode}): rounds {res['rounds']} s, model loads per agent {res['model_loads']}", flush=True)
    results["in_process"] = in_process(folder / "in-process", owners, config)
    load["in-process"] = load["end"] = os.getloadavg()
    results["load_average"] = load
    base = results["in_process"]["rounds"]
    print(f"in-process: rounds {base} s", flush=True)
    print(f"\n{args.model}, 3 owners x {args.rows} rows, DP + secure aggregation, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs; load average (1 min) at the start {load['start'][0]:.1f}, after "
          + ", after ".join(f"{k} {v[0]:.1f}" for k, v in load.items() if k not in ("start", "end")))
    print(f"{'':<24}{'round 1':>10}{'rounds 2+':>12}{'ratio r1':>10}{'ratio 2+':>10}")
    print(f"{'in-process':<24}{base[0]:>10.1f}{mean(base[1:]):>12.1f}{1.0:>10.2f}{1.0:>10.2f}")
    for mode, res in results["deployed"].items():
        r = res["rounds"]
        res["ratio_round1"] = r[0] / base[0]
        res["ratio_later"] = mean(r[1:]) / mean(base[1:]) if len(r) > 1 else None
        res["ratio_all"] = mean(r) / mean(base)
        later = f"{res['ratio_later']:>10.2f}" if res["ratio_later"] is not None else f"{'-':>10}"
        print(f"{'deployed, ' + mode:<24}{r[0]:>10.1f}{mean(r[1:]):>12.1f}{res['ratio_round1']:>10.2f}{later}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
