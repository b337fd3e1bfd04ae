"""Arrow backend: one shard is one Arrow IPC file, zstd-compressed; each array one column with one row per
sequence, trailing dimensions as (nested) fixed_size_list. Shapes and dtypes are also kept in the schema metadata,
so zero-size arrays and float16 round-trip exactly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

SUFFIX = ".arrow"
NAME = "data" + SUFFIX  # the IPC file inside a shard folder
META_KEY = b"kdcache.arrays"


def _column(array: np.ndarray) -> pa.Array:
    """(n, d1, d2, ...) -> an Arrow array of n rows of fixed_size_list(...(d2), d1). Rows with no elements (a
    trailing dimension of 0) are a null column: Arrow cannot hold fixed_size_list of size 0 safely."""
    if 0 in array.shape[1:]:
        return pa.nulls(array.shape[0])
    flat = pa.array(np.ascontiguousarray(array).reshape(-1))
    for size in reversed(array.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


def write(path: Path, arrays: dict[str, np.ndarray], zstd_level: int = 3) -> None:
    lengths = {name: a.shape[0] if a.ndim else None for name, a in arrays.items()}
    if len(set(lengths.values())) > 1 or None in lengths.values():
        raise ValueError(f"arrays of one Arrow shard need the same leading sequence axis, got {lengths}")
    meta = {name: {"shape": list(a.shape), "dtype": a.dtype.str} for name, a in arrays.items()}
    columns = {name: _column(a) for name, a in arrays.items()}
    schema = pa.schema([pa.field(name, col.type) for name, col in columns.items()],
                       metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()})
    options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=zstd_level))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema, options=options) as writer:
        writer.write_table(pa.table(columns, schema=schema))


def read(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an IPC file on disk (any name; inside a store it is a shard's `NAME`)."""
    return decode({NAME: Path(path).read_bytes()}, names)


def decode(files: dict[str, bytes], names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a shard from its files' bytes (path relative to the shard folder -> bytes)."""
    if NAME not in files:
        raise ValueError(f"no Arrow file {NAME}")
    table = pa.ipc.open_file(pa.py_buffer(files[NAME])).read_all()
    meta = json.loads(table.schema.metadata[META_KEY])
    names = names if names is not None else sorted(meta)
    out = {}
    for name in names:
        shape, dtype = tuple(meta[name]["shape"]), np.dtype(meta[name]["dtype"])
        if 0 in shape:
            table.column(name)  # the column must exist even though it holds no values
            out[name] = np.zeros(shape, dtype)
            continue
        values = table.column(name).combine_chunks()
        for _ in shape[1:]:
            values = values.flatten()
        out[name] = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(shape)
    return out
