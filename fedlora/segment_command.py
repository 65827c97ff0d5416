"""`fedlora segment`: customer segments across owners by federated, DP, securely aggregated k-means.

Its own flags, mapped onto `FedConfig` (the `segment_*` fields and the shared data, model,
privacy and secure-aggregation settings), so it stays out of `fedlora simulate`'s flag list.
"""

from __future__ import annotations

import argparse
import json

# flag -> (FedConfig field, type, help)
_FLAGS = {
    "--k": ("segment_k", int, "number of segments (default: 8)"),
    "--rounds": ("segment_rounds", int, "Lloyd rounds after the federated-mean initialisation (default: 5)"),
    "--target-epsilon": ("segment_epsilon", float, "each owner's epsilon over the whole segmentation (default: 2)"),
    "--checkpoint": ("segment_checkpoint", str, "embed with a federated checkpoint's encoder (a run or round-NNN folder)"),
    "--data": ("data", str, "CSV, TSV, JSONL or Parquet of the owners' customers (default: synthetic reviews)"),
    "--text-column": ("text_column", str, "column with the customer's text (default: text)"),
    "--partition-by": ("partition_by", str, "one owner per value of this column (default: brand on the synthetic data, "
                      "an iid split over --num-clients with --data)"),
    "--num-clients": ("num_clients", int, "owners of an iid split (with --partition-by '')"),
    "--min-client-examples": ("min_client_examples", int, "leave out owners with fewer rows (default: 20)"),
    "--model": ("model", str, "encoder: minilm (default), tiny-bert, or a local model folder"),
    "--delta": ("delta", float, "DP delta (default: 1e-5)"),
    "--seed": ("seed", int, "public seed: synthetic data, iid split, initial directions (never the noise)"),
    "--output": ("output", str, "folder for summary.json, centroids.npy, ledgers/ and owners/<name>/segments.*"),
    "--brands": ("brands", int, "synthetic data: number of brands"),
    "--examples-per-brand": ("examples_per_brand", int, "synthetic data: rows per brand"),
    "--client-cpus": ("client_cpus", float, "CPUs per virtual owner (default: 1)"),
}


def add_segment_command(sub) -> None:
    seg = sub.add_parser("segment", help="customer segments across owners (federated DP k-means, in simulation)")
    for flag, (dest, kind, help_text) in _FLAGS.items():
        seg.add_argument(flag, dest=dest, type=kind, default=None, help=help_text, metavar=flag[2:].upper())
    seg.add_argument("--no-dp", dest="dp", action="store_false", default=True, help="exact statistics (baselines only)")
    seg.add_argument("--secure-agg", dest="secure_agg", action=argparse.BooleanOptionalAction, default=True,
                     help="secure aggregation of the noisy sums and counts (default: on)")
    seg.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    seg.set_defaults(func=_cmd_segment)


def _cmd_segment(args: argparse.Namespace) -> int:
    from shared.config import FedConfig
    from simulations.segment import simulate_segment

    values = {dest: getattr(args, dest) for dest, *_ in _FLAGS.values() if getattr(args, dest) is not None}
    values.setdefault("output", "runs/segments")
    if "data" in values and "partition_by" not in values:  # as `fedlora simulate`: an own file splits iid
        values["partition_by"] = ""
    cfg = FedConfig(dp=args.dp, secure_agg=args.secure_agg, **values)
    summary = simulate_segment(cfg, verbose=args.verbose)
    eps = [c["epsilon"] for c in summary["clients"].values() if "epsilon" in c]
    print(json.dumps({"output": cfg.output, **summary["final"], "epsilon_max": max(eps) if eps and cfg.dp else None}))
    return 0
