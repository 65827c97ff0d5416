"""`fedlora segment`: customer segments across owners by federated, DP, securely aggregated k-means.

Its own flags, mapped onto `FedConfig` (the `segment_*` fields and the shared data, model,
privacy and secure-aggregation settings), so it stays out of `fedlora simulate`'s flag list;
their help is the fields' own (`fedlora.flags.add_field_flag`), written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from fedlora.flags import add_field_flag

OUTPUT = "runs/segments"  # this command's default --output
# flag -> FedConfig field
_FLAGS = {
    "--k": "segment_k",
    "--rounds": "segment_rounds",
    "--target-epsilon": "segment_epsilon",
    "--checkpoint": "segment_checkpoint",
    "--data": "data",
    "--text-column": "text_column",
    "--partition-by": "partition_by",
    "--num-clients": "num_clients",
    "--min-client-examples": "min_client_examples",
    "--model": "model",
    "--delta": "delta",
    "--seed": "seed",
    "--output": "output",
    "--brands": "brands",
    "--examples-per-brand": "examples_per_brand",
    "--client-cpus": "client_cpus",
}


def add_segment_command(sub) -> None:
    seg = sub.add_parser("segment", help="customer segments across owners (federated DP k-means, in simulation)")
    for flag, name in _FLAGS.items():
        shown = OUTPUT if name == "output" else dataclasses.MISSING
        add_field_flag(seg, name, flag, shown_default=shown, metavar=flag[2:].upper())
    seg.add_argument("--no-dp", dest="dp", action="store_false", default=True, help="exact statistics (baselines only)")
    seg.add_argument("--secure-agg", dest="secure_agg", action=argparse.BooleanOptionalAction, default=True,
                     help="secure aggregation of the noisy sums and counts (default: on)")
    seg.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    seg.set_defaults(func=_cmd_segment)


def _cmd_segment(args: argparse.Namespace) -> int:
    from shared.config import FedConfig
    from simulations.segment import simulate_segment

    values = {name: getattr(args, name) for name in _FLAGS.values() if getattr(args, name) is not None}
    values.setdefault("output", OUTPUT)
    if "data" in values and "partition_by" not in values:  # as `fedlora simulate`: an own file splits iid
        values["partition_by"] = ""
    cfg = FedConfig(dp=args.dp, secure_agg=args.secure_agg, **values)
    summary = simulate_segment(cfg, verbose=args.verbose)
    eps = [c["epsilon"] for c in summary["clients"].values() if "epsilon" in c]
    print(json.dumps({"output": cfg.output, **summary["final"], "epsilon_max": max(eps) if eps and cfg.dp else None}))
    return 0
