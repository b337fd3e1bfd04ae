"""Zarr v3 backend: one shard is one Zarr group; each array is one file (Zarr's sharding codec) holding inner
chunks of `chunk_sequences` sequences, each compressed with zstd.

Inner chunks let a reader fetch a few sequences without decompressing the whole array; one file per array keeps
the file count (and the checksum walk) small. Measured on a real top-16 cache (`make bench-store`): byte shuffle
ahead of zstd shrinks float arrays (float16 log-probs 25.2 -> 21.2 B/token) but grows integer ids (24.2 -> 26.8),
so floats are shuffled and integers are not; inner chunks of 8 sequences instead of 32 cost ~2 B/token.

Reading decodes the files' bytes directly (`decode`): the store has already read them once to check their
checksum, and zarr-python's reader costs ~5x the decompression itself per shard (async tasks, a thread handoff
per file and codec, metadata objects), which capped the reader well below 1M tokens/s on one core. The direct
path reads exactly the layout `write` makes (one shard file per array, the Zarr v3 sharding format); any other
layout is handed to zarr-python.
"""
from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import google_crc32c  # zarr's own crc32c implementation (a zarr dependency)
import numcodecs
import numpy as np
import zarr
from zarr.api.asynchronous import open_group as open_group_async
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync

SUFFIX = ".zarr"
NAME = "data" + SUFFIX  # the group's folder inside a shard folder
CHUNK_SEQUENCES = 32
_EMPTY = 2**64 - 1  # a shard index entry (offset, nbytes) of an inner chunk never written: all fill value
_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _compressors(array: np.ndarray, zstd_level: int, shuffle: str | None):
    if shuffle == "auto":
        shuffle = "shuffle" if array.dtype.kind == "f" and array.dtype.itemsize > 1 else None
    if shuffle:  # blosc's byte/bit shuffle ahead of zstd (a standard Zarr v3 codec)
        return [BloscCodec(cname="zstd", clevel=zstd_level, shuffle=shuffle, typesize=array.dtype.itemsize)]
    return [ZstdCodec(level=zstd_level)]


def write(path: Path, arrays: dict[str, np.ndarray], zstd_level: int = 3, chunk_sequences: int = CHUNK_SEQUENCES,
          shuffle: str | None = "auto") -> None:
    """shuffle: "auto" (byte shuffle for float arrays), "shuffle", "bitshuffle" or None (zstd alone)."""
    group = zarr.open_group(str(path), mode="w")
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.ndim == 0:
            raise ValueError(f"array {name!r} is a scalar: store arrays with a leading sequence axis")
        full = tuple(max(1, d) for d in array.shape)
        chunk_shape = (min(full[0], chunk_sequences),) + full[1:]
        # a shard must hold whole inner chunks: round the sequence axis up (the last chunk is partial)
        shard_shape = (-(-full[0] // chunk_shape[0]) * chunk_shape[0],) + full[1:]
        out = group.create_array(name, shape=array.shape, dtype=array.dtype, chunks=chunk_shape,
                                 shards=shard_shape, compressors=_compressors(array, zstd_level, shuffle))
        if array.size:
            out[...] = array


def read(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a group folder on disk (any name; inside a store it is a shard's `NAME`)."""
    path = Path(path)
    return decode({f"{NAME}/{p.relative_to(path).as_posix()}": p.read_bytes()
                   for p in path.rglob("*") if p.is_file()}, names)


def decode(files: dict[str, bytes], names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a shard from its files' bytes (path relative to the shard folder -> bytes)."""
    prefix = NAME + "/"
    tree = {path[len(prefix):]: data for path, data in files.items() if path.startswith(prefix)}
    if "zarr.json" not in tree:
        raise ValueError(f"no Zarr group {NAME}/zarr.json")
    metas = {path[:-len("/zarr.json")]: json.loads(data) for path, data in tree.items()
             if path.endswith("/zarr.json") and path.count("/") == 1}
    names = sorted(metas) if names is None else list(names)
    out = {}
    for name in names:
        if name not in metas:
            raise KeyError(f"array {name!r} is not in the shard (it has {', '.join(sorted(metas)) or 'none'})")
        layout = _layout(metas[name])
        if layout is None:  # not what `write` makes (another kdcache or zarr version): zarr-python reads it
            return _decode_with_zarr(tree, names)
        shard_file = f"{name}/c/" + "/".join("0" * len(layout["shape"]))
        out[name] = _decode_shard(layout, tree.get(shard_file))
    return out


def _layout(meta: dict) -> dict | None:
    """What `_decode_shard` needs when `meta` describes the layout `write` makes — one shard file per array
    (sharding_indexed, index at the end as little-endian uint64 + crc32c), inner chunks of the bytes codec and at
    most one zstd or blosc compressor — else None."""
    try:
        shape, grid = tuple(meta["shape"]), meta["chunk_grid"]
        shard_shape = tuple(grid["configuration"]["chunk_shape"])
        (sharding,) = meta["codecs"]
        config = sharding["configuration"]
        inner = tuple(config["chunk_shape"])
        codecs, index_codecs = config["codecs"], config["index_codecs"]
        fill = meta["fill_value"]
        if (meta.get("zarr_format") != 3 or grid["name"] != "regular" or sharding["name"] != "sharding_indexed"
                or meta.get("storage_transformers") or not len(shard_shape) == len(shape) == len(inner)
                or any(s < n or s % c for s, n, c in zip(shard_shape, shape, inner))  # one shard, whole chunks
                or meta["chunk_key_encoding"] != {"name": "default", "configuration": {"separator": "/"}}
                or config.get("index_location", "end") != "end"
                or [c["name"] for c in index_codecs] != ["bytes", "crc32c"]
                or not _little_endian(index_codecs[0]) or codecs[0]["name"] != "bytes" or not _little_endian(codecs[0])
                or len(codecs) > 2 or isinstance(fill, (str, list, dict)) or fill is None):
            return None
        compressor = _compressor(codecs[1]) if len(codecs) == 2 else None
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    except (KeyError, TypeError, ValueError):
        return None
    if compressor is False or dtype.kind not in "biuf":
        return None
    return {"shape": shape, "inner": inner, "chunks": tuple(s // c for s, c in zip(shard_shape, inner)),
            "dtype": dtype, "fill": fill, "compressor": compressor}


def _little_endian(codec: dict) -> bool:
    return (codec.get("configuration") or {}).get("endian", "little") == "little"


def _compressor(codec: dict):
    """A numcodecs codec for a zstd/blosc entry; False for any other (read by zarr-python instead)."""
    config = codec.get("configuration") or {}
    if codec["name"] == "zstd":
        return numcodecs.Zstd(level=config.get("level", 0))
    if codec["name"] == "blosc" and config.get("shuffle", "noshuffle") in _SHUFFLES:
        return numcodecs.Blosc(cname=config.get("cname", "zstd"), clevel=config.get("clevel", 5),
                               shuffle=_SHUFFLES[config.get("shuffle", "noshuffle")])
    return False


def _decode_shard(layout: dict, data: bytes | None) -> np.ndarray:
    """One array from its shard file: the inner chunks at the offsets in the index at the file's end."""
    inner, chunks, dtype = layout["inner"], layout["chunks"], layout["dtype"]
    out = np.full(tuple(n * c for n, c in zip(chunks, inner)), layout["fill"], dtype)    # whole inner chunks
    if data is not None:  # no file: every inner chunk is the fill value (zarr writes none of them)
        n = math.prod(chunks)
        index_size = 16 * n + 4
        body, stored_crc = data[-index_size:-4], data[-4:]
        if len(data) < index_size or google_crc32c.value(body).to_bytes(4, "little") != stored_crc:
            raise ValueError("the shard index is damaged (crc32c mismatch)")
        index = np.frombuffer(body, "<u8").reshape(n, 2)                                  # (offset, nbytes)
        chunk_bytes = math.prod(inner) * dtype.itemsize
        view = memoryview(data)
        for i, (offset, nbytes) in enumerate(index.tolist()):
            if offset == _EMPTY and nbytes == _EMPTY:
                continue
            if offset + nbytes > len(data) - index_size:
                raise ValueError(f"inner chunk {i} lies outside the shard file")
            raw = view[offset:offset + nbytes]
            if layout["compressor"] is not None:
                raw = layout["compressor"].decode(raw)
            if len(raw) != chunk_bytes:
                raise ValueError(f"inner chunk {i} decodes to {len(raw)} bytes, not {chunk_bytes}")
            where = tuple(slice(k * c, (k + 1) * c) for k, c in zip(np.unravel_index(i, chunks), inner))
            out[where] = np.frombuffer(raw, dtype).reshape(inner)
    return out[tuple(slice(0, s) for s in layout["shape"])]


def _decode_with_zarr(tree: dict[str, bytes], names: list[str]) -> dict[str, np.ndarray]:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    buffer = default_buffer_prototype().buffer
    store = MemoryStore({path: buffer.from_bytes(data) for path, data in tree.items()})
    return sync(_read_group(store, names))


async def _read_group(store, names: list[str]) -> dict[str, np.ndarray]:
    # all arrays in one trip to zarr's IO loop: per-array synchronous reads cost ~2x more (a thread handoff each)
    group = await open_group_async(store=store, mode="r")
    arrays = await asyncio.gather(*(group.getitem(name) for name in names))
    data = await asyncio.gather(*(a.getitem(...) for a in arrays))
    return {name: np.asarray(a) for name, a in zip(names, data)}
