"""Zarr v3 backend: one shard is one Zarr group, each array one zstd-compressed chunk."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

SUFFIX = ".zarr"


def write(path: Path, arrays: dict[str, np.ndarray], zstd_level: int = 3) -> None:
    group = zarr.open_group(str(path), mode="w")
    for name, array in arrays.items():
        out = group.create_array(name, shape=array.shape, dtype=array.dtype,
                                 chunks=array.shape if array.size else None,
                                 compressors=[ZstdCodec(level=zstd_level)])
        if array.size:
            out[...] = array


def read(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    names = names if names is not None else sorted(group.array_keys())
    return {name: group[name][...] for name in names}
