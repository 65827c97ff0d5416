"""Adapter tensors <-> Flower ArrayRecord, and what they cost on the wire."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    return int(sum(len(array.data) for array in record.values()))
