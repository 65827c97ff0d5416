"""Whole-or-nothing file writes: every file fedlora saves (keys, ledgers, checkpoints'
reports, cached features) is written through `atomic_write`, so a crash, a full disk or a
concurrent writer never leaves a torn file where an earlier good one was."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: Path, data: bytes | str | Callable[[BinaryIO], object], *,
                 private: bool = False, durable: bool = False) -> None:
    """Write `data` (bytes, text as UTF-8, or a function filling a binary file) to `path`.

    The data goes to a temporary file in the same folder, unique to this writer, which
    then replaces `path` in one rename; on any error the temporary file is removed and
    `path` is as it was. `private`: mode 0600 (keys, an owner's features), else 0644.
    `durable`: the file and its folder are fsynced before returning (the privacy ledger:
    a power cut must not lose spent budget)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
