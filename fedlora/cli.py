"""`fedlora`: the command line for simulation (and, as they land, deployment).

Flags map one-to-one onto `shared.config.FedConfig` fields. Bad input ends with one
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

from shared.config import FedConfig
from shared.errors import FedLoraError

_HELP = {
    "model": "minilm (default), smollm2-135m, tiny-bert, or a local model folder / HF id",
    "data": "CSV, TSV, JSONL or Parquet of training data (default: synthetic marketing reviews)",
    "test_data": "held-out file for server evaluation (default: 20%% of --data)",
    "partition_by": "natural partitioning: one client per value of this column",
    "partition": "iid or dirichlet:ALPHA (used when --partition-by is not set)",
    "target_epsilon": "each client's epsilon budget over the whole run",
    "delta": "DP delta; must be below 1/N for each client's N examples",
    "lora": "ffa (A frozen from a shared seed, only B trains) or plain",
    "output": "folder for summary.json, metrics.csv, checkpoints and the plot",
    "resume": "continue from a checkpoint folder or a previous --output",
    "lr": "Adam learning rate of the LoRA adapter tensors (default: 0.03)",
    "head_lr": "Adam learning rate of the task head (default: 0.2)",
    "max_grad_norm": "DP per-example clipping norm (default: 0.3)",
    "brands": "synthetic data: number of brands (data owners)",
    "labels": "JSON list fixing the global label set (default: from the training data)",
    "max_length": "tokens per text; 0 (default): the 95th percentile of each owner's data, bucketed",
    "max_length_cap": "longest length the data-driven choice may pick (default: 256)",
    "min_client_examples": "simulation: leave out owners with fewer rows (default: 20)",
    "local_baseline": "simulation: also train each owner alone at the same budget and compare",
    "optimizer": "adam (default), mixed (SGD+momentum head, Adam adapter) or sgd; under DP SGD rates are per unit of clipped gradient",
    "clipping": "flat (default) or split (head and adapter each clipped to half the squared budget)",
}
_SPECIAL = {"dp", "secure_agg", "partition_by", "partition", "num_clients"}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(FedConfig):
        if f.name in _SPECIAL or f.name.startswith("segment_"):  # `fedlora segment` has its own flags
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = _HELP.get(f.name, f"default: {f.default}")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=type(f.default), default=None, help=help_text)
    parser.add_argument("--num-clients", type=int, default=None, help="default: one per brand (synthetic) or 6")
    parser.add_argument("--partition-by", default=None, help=_HELP["partition_by"])
    parser.add_argument("--partition", default=None, help=_HELP["partition"])
    parser.add_argument("--no-dp", dest="dp", action="store_false", default=True, help="turn DP off (baselines only)")
    parser.add_argument("--secure-agg", dest="secure_agg", action=argparse.BooleanOptionalAction, default=True,
                        help="secure aggregation of masked updates (default: on)")


def config_from_args(args: argparse.Namespace) -> FedConfig:
    values = {f.name: getattr(args, f.name) for f in fields(FedConfig)
              if f.name not in _SPECIAL and getattr(args, f.name, None) is not None}
    values["dp"], values["secure_agg"] = args.dp, args.secure_agg
    cfg = FedConfig(**values)
    explicit_split = args.partition_by is not None or args.partition is not None
    num_clients = args.num_clients
    if args.partition_by:
        partition_by = args.partition_by
    elif not cfg.data and not explicit_split and num_clients in (None, cfg.brands):
        partition_by = "brand"  # synthetic default: one data owner per brand
    else:
        partition_by = ""
    if not partition_by and num_clients is None:
        num_clients = cfg.num_clients
    cfg = cfg.replace(partition_by=partition_by, partition=args.partition or "iid",
                      num_clients=num_clients if num_clients is not None else cfg.brands)
    if cfg.secure_agg and max(1, int(cfg.num_clients * cfg.fraction)) < 2:
        print("fedlora: note: secure aggregation needs at least 2 clients per round; running without it", file=sys.stderr)
        cfg = cfg.replace(secure_agg=False)
    cfg.validate()
    return cfg


def _cmd_simulate(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from server.report import epsilon_max
    from simulations.run import simulate

    summary = simulate(cfg, verbose=args.verbose)
    print(json.dumps({"output": cfg.output, "final": summary["final"],
                      "epsilon_max": epsilon_max(summary) if cfg.dp else None}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated DP LoRA fine-tuning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federation of virtual clients on this machine")
    _add_config_flags(sim)
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sim.set_defaults(func=_cmd_simulate)
    from fedlora.deploy_commands import add_deploy_commands
    add_deploy_commands(sub)
    from fedlora.segment_command import add_segment_command
    add_segment_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):  # quiet by default: --verbose shows the libraries' own chatter
        import warnings

        os.environ.setdefault("TQDM_DISABLE", "1")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest) alpha.*")
    try:
        return args.func(args)
    except FedLoraError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted; checkpoints and ledgers written so far are kept", file=sys.stderr)
        return 130
