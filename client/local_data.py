"""Where a client's examples come from: its simulated partition or the owner's own file."""

from __future__ import annotations

from typing import Mapping

import pandas as pd

from shared.config import FedConfig
from shared.data import client_partition, normalize, read_table
from shared.errors import FedLoraError


def client_frame(cfg: FedConfig, node_config: Mapping) -> tuple[pd.DataFrame, str]:
    """In deployment the node config names a local file that never leaves this machine."""
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        owner_cfg = cfg.replace(
            text_column=str(node_config.get("text-column", cfg.text_column)),
            label_column=str(node_config.get("label-column", cfg.label_column)),
            profile_column=str(node_config.get("profile-column", cfg.profile_column)),
            offer_column=str(node_config.get("offer-column", cfg.offer_column)),
            prompt_column=str(node_config.get("prompt-column", cfg.prompt_column)),
            response_column=str(node_config.get("response-column", cfg.response_column)),
        )
        return normalize(read_table(path), owner_cfg, path), path
    if "partition-id" not in node_config:
        raise FedLoraError("node config needs either 'data-path' (deployment) or 'partition-id' (simulation)")
    pid = int(node_config["partition-id"])
    return client_partition(cfg, pid), f"partition {pid}"
