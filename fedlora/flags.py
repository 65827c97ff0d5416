"""FedConfig <-> command-line flags, shared by `simulate`, `run`, `predict`, `segment` and `client`.

Flags map one-to-one onto `shared.config.FedConfig` fields and take their help from
the fields' metadata, so this module needs neither `fedlora.cli` nor the deployment
commands (which used to import each other for it), and each flag's text is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import fields

from shared.config import FedConfig, flag_help

_SPECIAL = {"dp", "secure_agg", "partition_by", "partition", "num_clients"}
FIELDS = {f.name: f for f in fields(FedConfig)}


def add_field_flag(parser, name: str, flag: str | None = None, *, default=None,
                   shown_default=dataclasses.MISSING, **kwargs) -> None:
    """A flag (default `--<field-name>`) for the FedConfig field `name`, parsed into
    `args.<name>` with the field's type and help. `default` is the value when the flag
    is absent (None: the config's own); `shown_default` is the default the help names
    where a command uses its own."""
    f = FIELDS[name]
    flag = flag or "--" + name.replace("_", "-")
    text = flag_help(f, shown_default)
    if isinstance(f.default, bool):
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=text, **kwargs)
    else:
        parser.add_argument(flag, dest=name, type=type(f.default), default=default, help=text, **kwargs)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(FedConfig):
        if f.name in _SPECIAL or f.name.startswith("segment_"):  # `fedlora segment` has its own flags
            continue
        add_field_flag(parser, f.name)
    for name in ("num_clients", "partition_by", "partition"):  # after the rest, as before; None: decided below
        add_field_flag(parser, name)
    parser.add_argument("--no-dp", dest="dp", action="store_false", default=True, help="turn DP off (baselines only)")
    parser.add_argument("--secure-agg", dest="secure_agg", action=argparse.BooleanOptionalAction, default=True,
                        help="secure aggregation of masked updates (default: on)")


def config_from_args(args: argparse.Namespace) -> FedConfig:
    values = {f.name: getattr(args, f.name) for f in fields(FedConfig)
              if f.name not in _SPECIAL and getattr(args, f.name, None) is not None}
    values["dp"], values["secure_agg"] = args.dp, args.secure_agg
    from shared.tasks import with_task_defaults

    cfg = FedConfig(**with_task_defaults(values))  # each task's own starting settings, where no flag was given
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
