"""Adapter tensors <-> Flower ArrayRecord, and what they cost on the wire."""

from __future__ import annotations

from functools import lru_cache
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord

_NPY_MAGIC = b"\x93NUMPY"


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    return int(sum(len(array.data) for array in record.values()))


def array_view(array: Array) -> np.ndarray:
    """``array.numpy()`` as a read-only view of its bytes, without the copy and the npy header
    parse (``ast.literal_eval`` per call) that dominate for many small tensors. Headers are
    parsed once each by numpy itself; anything unusual (Fortran order, object dtypes, npy 3.0,
    a size mismatch) takes ``array.numpy()``."""
    data = array.data
    if array.stype != "numpy.ndarray" or not isinstance(data, bytes) or data[:6] != _NPY_MAGIC:
        return array.numpy()
    if data[6] == 1:
        start = 10 + int.from_bytes(data[8:10], "little")
    elif data[6] == 2:
        start = 12 + int.from_bytes(data[8:12], "little")
    else:
        return array.numpy()
    shape, fortran, dtype = _npy_header(data[:start])
    count = int(np.prod(shape))
    if fortran or dtype.hasobject or len(data) - start != count * dtype.itemsize:
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)


@lru_cache(maxsize=1024)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    fp = BytesIO(prefix)
    major, _ = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(fp)
