"""The local cache folder (`$FEDLORA_CACHE`, default `~/.cache/fedlora`): what this machine
computed or converted once (datasets, the SmolLM2 conversion, embeddings, noise
calibrations), kept for reruns. It is the owner's own disk, like its data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora")).joinpath(*parts)
