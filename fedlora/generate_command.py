"""`fedlora generate`: copy from a --task generate checkpoint (simulation or deployment)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_COLUMNS = ("prompt_column", "response_column")


def _cmd_generate(args: argparse.Namespace) -> int:
    from shared.inference import generate_copy, generate_file

    if args.prompt is not None:
        generate_copy(Path(args.checkpoint), args.prompt, args.max_new_tokens, args.device)  # streams to stdout
        sys.stdout.write("\n")
        return 0
    columns = {name: getattr(args, name) for name in _COLUMNS if getattr(args, name)}
    result = generate_file(Path(args.checkpoint), Path(args.data), Path(args.output) if args.output else None,
                           args.max_new_tokens, args.device, columns)
    print(json.dumps(result))
    return 0


def add_generate_command(sub) -> None:
    p = sub.add_parser("generate", help="write copy with a --task generate checkpoint: one prompt (streamed) or a file")
    p.add_argument("--checkpoint", required=True, help="a run's --output folder (its latest round) or a checkpoints/round-NNN folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; the copy streams to stdout as it is written")
    source.add_argument("--data", help="CSV, TSV, JSONL or Parquet with a prompt column: a generated response is added per row")
    p.add_argument("--output", default=None, help="with --data: where to write (default: <data>-generated.<ext> beside it)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest copy, in tokens (default: 64)")
    for name in _COLUMNS:
        p.add_argument("--" + name.replace("_", "-"), default=None, help="default: the run's own column name")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(func=_cmd_generate)
