"""`fedlora predict`: score a file with a trained checkpoint (simulation or deployment)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_COLUMNS = ("text_column", "label_column", "profile_column", "offer_column")


def _cmd_predict(args: argparse.Namespace) -> int:
    from shared.inference import predict_file

    columns = {name: getattr(args, name) for name in _COLUMNS if getattr(args, name)}
    result = predict_file(Path(args.checkpoint), Path(args.data), Path(args.output), args.batch_size,
                          args.device, columns)
    print(json.dumps(result))
    return 0


def add_predict_command(sub) -> None:
    p = sub.add_parser("predict", help="add predictions (label and probability, or click probability) to a file")
    p.add_argument("--checkpoint", required=True, help="a run's --output folder (its latest round) or a checkpoints/round-NNN folder")
    p.add_argument("--data", required=True, help="CSV, TSV, JSONL or Parquet with the task's input columns (labels optional)")
    p.add_argument("--output", required=True, help="where to write the scored rows (.csv, .tsv, .jsonl or .parquet)")
    for name in _COLUMNS:
        p.add_argument("--" + name.replace("_", "-"), default=None, help="default: the run's own column name")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(func=_cmd_predict)
