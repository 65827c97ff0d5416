"""`fedlora`: the command line for simulation, prediction and deployment.

Flags map one-to-one onto `shared.config.FedConfig` fields (fedlora/flags.py). Bad input
ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from fedlora.deploy_commands import add_deploy_commands
from fedlora.flags import add_config_flags, config_from_args  # noqa: F401 (config_from_args: the CLI's API)
from fedlora.generate_command import add_generate_command
from fedlora.predict_command import add_predict_command
from shared.errors import FedLoraError


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
    add_config_flags(sim)
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sim.set_defaults(func=_cmd_simulate)
    add_predict_command(sub)
    add_generate_command(sub)
    add_deploy_commands(sub)
    from fedlora.segment_command import add_segment_command
    add_segment_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from shared.quiet import offline_and_quiet

    args = build_parser().parse_args(argv)
    offline_and_quiet(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except FedLoraError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted; checkpoints and ledgers written so far are kept", file=sys.stderr)
        return 130
