"""Encoding of sparse teacher signals into compact arrays, and back to one uniform sparse target. numpy only.

Signal kinds (n sequences x T positions; C support entries per position):

    topk    exact top-k ids, their log-probs sorted descending, and the log-normaliser (logits = logprobs + lognorm)
    sample  N draws with replacement from the teacher distribution (RS-KD), stored as unique ids + counts
    hybrid  exact top-k + N draws from the residual tail distribution (ids + counts)

Stored arrays (the codec's business; `encode_signal` writes them, `decode_signal` reads them):

    ids           (n, T, k)  uint16 when V <= 65,536, else uint8 (n, T, ceil(k*b/8)): k ids of b = ceil(log2 V)
                             bits each, bit-packed little-endian per position
    logprobs      (n, T, k)  float16 / float32 (value_encoding float16 / float32)
    top1, scale,  (n, T) float32, (n, T) float16, (n, T, k-1) uint8 (value_encoding int8): logprob_i =
    steps                    top1 - (steps_2 + ... + steps_i) * scale for i >= 2 (logprob_1 = top1); see
                             `quantise_logprobs`
    lognorm       (n, T)     float32
    counts        (n, T, M)  uint8 (sample): draws of each id, most drawn first, 0 = unused slot (stored id 0)
    tail_ids, tail_counts    (hybrid): like ids/counts of `sample`, draws from the tail renormalised
M is the largest number of unique ids at any position of the shard.

Decoded (`decode_signal`), the same for every kind:
    ids (n, T, C) int64, logprobs (n, T, C) float32 (estimate of the teacher log-prob over the FULL vocabulary,
    -inf = no entry; such slots repeat the row's first id), lognorm (n, T) float32 (zeros when not stored).
"""
from __future__ import annotations

import time

import numpy as np

from storage.errors import StoreError

KINDS = ("topk", "sample", "hybrid")
VALUE_ENCODINGS = ("float16", "float32", "int8")
MAX_SAMPLES = 255  # counts are uint8


# ---- ids -----------------------------------------------------------------------------------------------------

def id_bits(vocab_size: int) -> int:
    """Bits per id: ceil(log2 V)."""
    return max(1, int(np.ceil(np.log2(vocab_size))))


def ids_packed(vocab_size: int) -> bool:
    return vocab_size > 2**16


def id_dtype(vocab_size: int) -> np.dtype:
    """dtype of token ids in a token store: uint16 when the vocabulary fits, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def signal_id_dtype(vocab_size: int) -> np.dtype:
    """dtype of a signal store's id arrays: uint16, or uint8 bytes of bit-packed ids for larger vocabularies."""
    return np.dtype(np.uint16) if not ids_packed(vocab_size) else np.dtype(np.uint8)


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """ids (..., C) non-negative < 2**bits -> (..., ceil(C*bits/8)) uint8, each id's bits little-endian."""
    lead, c = ids.shape[:-1], ids.shape[-1]
    words = np.ascontiguousarray(ids, dtype="<u4").reshape(-1, c).view(np.uint8).reshape(-1, c, 4)  # (P, C, 4)
    bitplanes = np.unpackbits(words, axis=-1, bitorder="little")[..., :bits]                          # (P, C, b)
    packed = np.packbits(bitplanes.reshape(-1, c * bits), axis=-1, bitorder="little")                  # (P, B)
    return packed.reshape(*lead, packed.shape[-1])


def unpack_ids(packed: np.ndarray, bits: int, count: int | None = None) -> np.ndarray:
    """Inverse of `pack_ids`: (..., B) uint8 -> (..., C) int64; C = floor(8B / bits) unless given (bits >= 8
    makes that unambiguous). Each id is read as the 4 (or 8) bytes from its first byte on, as one little-endian
    word, shifted and masked: a gather and three vector ops, no per-bit work."""
    if not 1 <= bits <= 56:
        raise StoreError(f"cannot unpack {bits}-bit ids (1..56 bits)")
    lead, nbytes = packed.shape[:-1], packed.shape[-1]
    c = count if count is not None else (8 * nbytes) // bits
    start = np.arange(c, dtype=np.int64) * bits                                                     # (C,) bit offsets
    width, word = (4, np.uint32) if bits <= 25 else (8, np.uint64)  # an id spans <= 4 bytes when bits <= 25
    rows = np.zeros((int(np.prod(lead, dtype=np.int64)), nbytes + width), np.uint8)                 # (P, B + w)
    rows[:, :nbytes] = packed.reshape(-1, nbytes)
    window = np.take(rows, ((start // 8)[:, None] + np.arange(width)).reshape(-1), axis=1)          # (P, C*w)
    words = window.view(np.dtype(word).newbyteorder("<"))                                           # (P, C)
    ids = (words >> (start % 8).astype(word)) & word((1 << bits) - 1)
    return ids.astype(np.int64).reshape(*lead, c)


def encode_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    if vocab_size > 2**32:
        raise StoreError(f"vocab_size {vocab_size} exceeds 2**32 ids: not supported")
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise StoreError(f"signal ids out of range [0, {vocab_size}): min {ids.min()}, max {ids.max()}")
    if ids_packed(vocab_size):
        return pack_ids(ids, id_bits(vocab_size))
    return ids.astype(np.uint16)


def decode_ids(stored: np.ndarray, vocab_size: int, count: int | None = None) -> np.ndarray:
    if ids_packed(vocab_size):
        return unpack_ids(stored, id_bits(vocab_size), count)
    return stored.astype(np.int64)


# ---- top-k values ----------------------------------------------------------------------------------------------

def quantise_logprobs(logprobs: np.ndarray) -> dict[str, np.ndarray]:
    """Sorted log-probs (..., k) -> 8-bit offsets from the top-1 with a per-position scale, stored as steps.

    d_i = l_1 - l_i >= 0 is non-decreasing in i (sorted descending); scale = max_i d_i / 255, rounded UP to float16
    so every q_i = round(d_i / scale) fits in 0..255. Round-trip error |l_i' - l_i| <= scale / 2 (+ float32
    rounding), i.e. at most (l_1 - l_k) / 510 * (1 + 2**-10): for a top-16 spanning 10 nats, 0.02 nats (2% of
    that p_i). The top-1 is stored exactly (float32). q is non-decreasing, so it is stored losslessly as its steps
    q_i - q_(i-1) (q_1 = 0): small numbers that zstd shrinks by a quarter more than q itself (measured).
    """
    logprobs = np.asarray(logprobs, np.float32)
    if logprobs.size and not np.isfinite(logprobs).all():
        raise StoreError("int8 value encoding needs finite log-probs: use value_encoding float32 for -inf entries")
    top1 = logprobs[..., 0] if logprobs.shape[-1] else np.zeros(logprobs.shape[:-1], np.float32)     # (...,)
    if logprobs.size and logprobs.shape[-1] > 1:
        tolerance = 1e-6 * max(1.0, float(np.abs(logprobs).max()))
        if np.diff(logprobs, axis=-1).max() > tolerance:
            raise StoreError("int8 value encoding needs log-probs sorted descending per position")
    # within the tolerance, float noise could unsort d: the running max makes it monotone again
    deltas = np.maximum.accumulate(np.maximum(top1[..., None] - logprobs[..., 1:], 0), axis=-1)    # (..., k-1)
    span = deltas[..., -1] if deltas.shape[-1] else np.zeros(top1.shape, np.float32)               # (...,)
    scale = (span / 255).astype(np.float16)
    low = scale.astype(np.float32) < span / 255
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))  # round up so span / scale <= 255
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0)
    q = np.clip(np.rint(deltas / safe[..., None]), 0, 255).astype(np.int16)                         # (..., k-1)
    steps = np.diff(q, axis=-1, prepend=np.zeros(q.shape[:-1] + (1,), np.int16)).astype(np.uint8)
    return {"top1": top1.astype(np.float32), "scale": scale, "steps": steps}


def dequantise_logprobs(top1: np.ndarray, scale: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """(...,), (...,), (..., k-1) -> log-probs (..., k) float32."""
    out = np.empty(steps.shape[:-1] + (steps.shape[-1] + 1,), np.float32)                            # (..., k)
    out[..., 0] = top1
    q = np.cumsum(steps, axis=-1, dtype=np.int16)                                                     # (..., k-1)
    np.multiply(q, scale.astype(np.float32)[..., None], out=out[..., 1:])
    np.subtract(top1[..., None], out[..., 1:], out=out[..., 1:])
    return out


def _encode_values(logprobs: np.ndarray, value_encoding: str) -> dict[str, np.ndarray]:
    if value_encoding == "int8":
        return quantise_logprobs(logprobs)
    return {"logprobs": np.asarray(logprobs).astype(value_encoding)}


def _decode_values(arrays: dict[str, np.ndarray], value_encoding: str) -> np.ndarray:
    if value_encoding == "int8":
        return dequantise_logprobs(arrays["top1"], arrays["scale"], arrays["steps"])
    return arrays["logprobs"].astype(np.float32)


# ---- sampled ids + counts ------------------------------------------------------------------------------------

def _check_unique(ids: np.ndarray, used: np.ndarray, what: str) -> None:
    """Every position's used ids (..., C) are distinct."""
    if ids.size == 0 or ids.shape[-1] < 2:
        return
    flat = np.where(used, ids, -1 - np.arange(ids.shape[-1])).reshape(-1, ids.shape[-1])  # unused -> distinct negatives
    s = np.sort(flat, axis=-1)
    if (s[:, 1:] == s[:, :-1]).any():
        raise StoreError(f"{what}: an id appears twice at one position (store unique ids with their counts)")


def _encode_counts(ids: np.ndarray, counts: np.ndarray, vocab_size: int, prefix: str) -> dict[str, np.ndarray]:
    """ids, counts (n, T, M) -> stored ids + uint8 counts, most drawn first, trimmed to the shard's max unique ids."""
    ids, counts = np.asarray(ids), np.asarray(counts)
    if ids.shape != counts.shape or ids.ndim != 3:
        raise StoreError(f"{prefix}ids {ids.shape} and {prefix}counts {counts.shape} must both be (n, T, M)")
    if counts.size:
        if counts.min() < 0:
            raise StoreError(f"{prefix}counts must be >= 0 (0 = unused slot), got {counts.min()}")
        totals = counts.sum(-1)                                                                   # (n, T)
        n_draws = int(totals.flat[0])
        if n_draws < 1 or n_draws > MAX_SAMPLES or (totals != n_draws).any():
            raise StoreError(f"{prefix}counts must sum to the same N (1..{MAX_SAMPLES}) at every position, "
                             f"got sums {int(totals.min())}..{int(totals.max())}")
    order = np.argsort(-counts, axis=-1, kind="stable")                                           # (n, T, M)
    counts = np.take_along_axis(counts, order, -1)
    ids = np.take_along_axis(ids, order, -1)
    used = counts > 0
    _check_unique(ids, used, f"{prefix}ids")
    width = int(used.sum(-1).max()) if counts.size else counts.shape[-1]
    ids, counts, used = ids[..., :width], counts[..., :width], used[..., :width]
    ids = np.where(used, ids, 0)
    return {f"{prefix}ids": encode_ids(ids, vocab_size), f"{prefix}counts": counts.astype(np.uint8)}


with np.errstate(divide="ignore"):
    _LOG_COUNT = np.log(np.arange(MAX_SAMPLES + 1, dtype=np.float64)).astype(np.float32)  # log 0 = -inf: unused


def _decode_counts(counts: np.ndarray, n_draws: int, weight: np.ndarray | None = None) -> np.ndarray:
    """counts (n,T,M) uint8 -> log(weight * count / N) (n,T,M) float32, -inf for unused slots; weight (n,T)."""
    logprobs = _LOG_COUNT[counts]                                                                  # (n, T, M)
    offset = -np.log(np.float32(n_draws))
    if weight is not None:
        with np.errstate(divide="ignore"):
            offset = offset + np.log(weight.astype(np.float32))[..., None]                          # (n, T, 1)
    return logprobs + offset


def _fill_unused(ids: np.ndarray, counts: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Unused slots (count 0) of ids (n,T,M) take the row's first id (n,T,1), so they never alias a real id."""
    np.copyto(ids, first, where=counts == 0)
    return ids


# ---- the public codec ------------------------------------------------------------------------------------------

def _check_shapes(signal: dict, required: tuple[str, ...], kind: str) -> None:
    missing = [name for name in required if name not in signal]
    if missing:
        raise StoreError(f"{kind} signal lacks {', '.join(missing)} (needs {', '.join(required)})")


def _encode_topk_part(signal: dict, vocab_size: int, value_encoding: str) -> dict[str, np.ndarray]:
    ids, logprobs, lognorm = (np.asarray(signal[k]) for k in ("ids", "logprobs", "lognorm"))
    if ids.shape != logprobs.shape or ids.ndim != 3 or ids.shape[:-1] != lognorm.shape:
        raise StoreError(f"inconsistent signal shapes ids {ids.shape}, logprobs {logprobs.shape}, "
                         f"lognorm {lognorm.shape} (want (n, T, k), (n, T, k), (n, T))")
    return {"ids": encode_ids(ids, vocab_size), **_encode_values(logprobs, value_encoding),
            "lognorm": lognorm.astype(np.float32)}


def encode_signal(kind: str, signal: dict[str, np.ndarray], vocab_size: int, value_encoding: str = "float16",
                  ) -> dict[str, np.ndarray]:
    """kind topk:   signal = {ids (n,T,k) int, logprobs (n,T,k) float, lognorm (n,T) float}
       kind sample: signal = {ids (n,T,M) int, counts (n,T,M) int (0 = unused slot)}  [+ optional lognorm]
       kind hybrid: signal = {ids, logprobs, lognorm (top-k part), tail_ids (n,T,M), tail_counts (n,T,M)}
       -> the arrays to store (names/dtypes are the codec's business; see the module docstring).
    Counts must sum to the same N <= 255 at every position; ids at one position must be distinct."""
    if kind not in KINDS:
        raise StoreError(f"unknown signal kind {kind!r}: use one of {', '.join(KINDS)}")
    if value_encoding not in VALUE_ENCODINGS:
        raise StoreError(f"unknown value encoding {value_encoding!r}: use one of {', '.join(VALUE_ENCODINGS)}")
    if kind == "topk":
        _check_shapes(signal, ("ids", "logprobs", "lognorm"), kind)
        return _encode_topk_part(signal, vocab_size, value_encoding)
    if kind == "sample":
        _check_shapes(signal, ("ids", "counts"), kind)
        out = _encode_counts(signal["ids"], signal["counts"], vocab_size, "")
        if signal.get("lognorm") is not None:
            lognorm = np.asarray(signal["lognorm"], np.float32)
            if lognorm.shape != out["counts"].shape[:-1]:
                raise StoreError(f"sample lognorm {lognorm.shape} must be (n, T) = {out['counts'].shape[:-1]}")
            out["lognorm"] = lognorm
        return out
    _check_shapes(signal, ("ids", "logprobs", "lognorm", "tail_ids", "tail_counts"), kind)
    out = _encode_topk_part(signal, vocab_size, value_encoding)
    tail = _encode_counts(signal["tail_ids"], signal["tail_counts"], vocab_size, "tail_")
    if tail["tail_counts"].shape[:-1] != out["lognorm"].shape:
        raise StoreError(f"hybrid tail {tail['tail_counts'].shape[:-1]} and top-k {out['lognorm'].shape} positions differ")
    top_ids = np.asarray(signal["ids"])
    tail_ids = decode_ids(tail["tail_ids"], vocab_size, tail["tail_counts"].shape[-1])
    used = np.concatenate([np.ones(top_ids.shape, bool), tail["tail_counts"] > 0], -1)
    _check_unique(np.concatenate([top_ids.astype(np.int64), tail_ids], -1), used, "hybrid tail_ids and ids")
    return {**out, **tail}


def decode_signal(arrays: dict[str, np.ndarray], params: dict) -> dict[str, np.ndarray]:
    """Stored arrays + the store's manifest params (signal, vocab_size, value_encoding, samples, k ...) ->
    one uniform sparse target for every kind:
       ids      (n,T,C) int64
       logprobs (n,T,C) float32   teacher log-probability *estimate* of each id, normalised over the FULL vocab
       lognorm  (n,T)   float32   (zeros when the kind stores none)
    topk:   C = k, logprobs as stored (tail mass 1 - sum exp(logprobs) is the loss's business).
    sample: logprobs = log(count / N); the estimate sums to 1 (no tail).
    hybrid: C = k + M: the exact top-k, then tail ids with log(r * count / N), r = 1 - sum_topk p (sums to 1).
    Unused slots (count 0): id = the row's FIRST id (a duplicate, so it never aliases another vocabulary id)
    and logprob = -inf. Consumers treat logprob == -inf as 'no entry'."""
    kind = params.get("signal", "topk")
    vocab_size = params["vocab_size"]
    value_encoding = params.get("value_encoding", params.get("value_dtype", "float16"))
    if kind not in KINDS:
        raise StoreError(f"unknown signal kind {kind!r} in the store's manifest: use one of {', '.join(KINDS)}")
    if kind != "topk" and not isinstance(params.get("samples"), int):
        raise StoreError(f"a {kind} signal needs params.samples (the number of draws N), got {params.get('samples')!r}")
    if kind == "sample":
        counts = arrays["counts"]
        ids = decode_ids(arrays["ids"], vocab_size, counts.shape[-1])
        logprobs = _decode_counts(counts, params["samples"])
        lognorm = arrays["lognorm"].astype(np.float32) if "lognorm" in arrays else np.zeros(counts.shape[:-1], np.float32)
        return {"ids": _fill_unused(ids, counts, ids[..., :1]), "logprobs": logprobs, "lognorm": lognorm}
    logprobs = _decode_values(arrays, value_encoding)                                              # (n, T, k)
    ids = decode_ids(arrays["ids"], vocab_size, logprobs.shape[-1])                                 # (n, T, k)
    lognorm = arrays["lognorm"].astype(np.float32)                                                  # (n, T)
    if kind == "topk":
        return {"ids": ids, "logprobs": logprobs, "lognorm": lognorm}
    tail_counts = arrays["tail_counts"]
    tail_ids = decode_ids(arrays["tail_ids"], vocab_size, tail_counts.shape[-1])                   # (n, T, M)
    residual = np.clip(1.0 - np.exp(logprobs).sum(-1, dtype=np.float64), 0.0, 1.0)                  # (n, T)
    tail_logprobs = _decode_counts(tail_counts, params["samples"], residual)                        # (n, T, M)
    tail_ids = _fill_unused(tail_ids, tail_counts, ids[..., :1])
    return {"ids": np.concatenate([ids, tail_ids], -1), "logprobs": np.concatenate([logprobs, tail_logprobs], -1),
            "lognorm": lognorm}


def pad_signal(decoded: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """A decoded signal with C < width entries per position -> width entries, the new slots unused (the row's first
    id, logprob -inf): so targets of shards with different M stack into one batch."""
    ids, logprobs = decoded["ids"], decoded["logprobs"]
    extra = width - ids.shape[-1]
    if extra < 0:
        raise StoreError(f"cannot pad a signal of {ids.shape[-1]} entries per position to {width}")
    if extra == 0:
        return decoded
    first = ids[..., :1] if ids.shape[-1] else np.zeros(ids.shape[:-1] + (1,), ids.dtype)
    return {**decoded, "ids": np.concatenate([ids, np.repeat(first, extra, -1)], -1),
            "logprobs": np.concatenate([logprobs, np.full(logprobs.shape[:-1] + (extra,), -np.inf, np.float32)], -1)}


def signal_params(kind: str, vocab_size: int, value_encoding: str = "float16", k: int | None = None,
                  samples: int | None = None) -> dict:
    """The manifest params `decode_signal` needs (a signal store's manifest holds these among others)."""
    return {"signal": kind, "vocab_size": vocab_size, "value_encoding": value_encoding, "k": k, "samples": samples}


def stored_arrays(params: dict) -> dict[str, tuple[str, int | None]]:
    """name -> (dtype, trailing size or None for (n, T) arrays; -1 = shard-dependent M) for a store's params:
    what `kdcache verify` expects to find in every shard."""
    kind, vocab_size = params.get("signal", "topk"), params["vocab_size"]
    encoding = params.get("value_encoding", params.get("value_dtype", "float16"))
    id_dt = signal_id_dtype(vocab_size).name
    out: dict[str, tuple[str, int | None]] = {}
    if kind in ("topk", "hybrid"):
        k = params["k"]
        out["ids"] = (id_dt, -(-k * id_bits(vocab_size) // 8) if ids_packed(vocab_size) else k)
        if encoding == "int8":
            out.update(top1=("float32", None), scale=("float16", None), steps=("uint8", k - 1))
        else:
            out["logprobs"] = (encoding, k)
        out["lognorm"] = ("float32", None)
    if kind == "sample":
        out.update(ids=(id_dt, -1), counts=("uint8", -1))
    if kind == "hybrid":
        out.update(tail_ids=(id_dt, -1), tail_counts=("uint8", -1))
    return out


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, lognorm: np.ndarray, vocab_size: int,
                value_dtype: str = "float16") -> dict[str, np.ndarray]:
    """The topk kind of `encode_signal` (kept for existing callers)."""
    return encode_signal("topk", {"ids": ids, "logprobs": logprobs, "lognorm": lognorm}, vocab_size, value_dtype)


def decode_topk(arrays: dict[str, np.ndarray], vocab_size: int = 2**16, value_encoding: str = "float16",
                ) -> dict[str, np.ndarray]:
    """Stored top-k arrays -> ids int64, logprobs float32, lognorm float32 (prefer `decode_signal`)."""
    return decode_signal(arrays, signal_params("topk", vocab_size, value_encoding))


def decode_throughput(kind: str = "topk", k: int = 16, value_encoding: str = "float16", vocab_size: int = 49152,
                      positions: int = 262_144, samples: int = 50, repeats: int = 5, seed: int = 0) -> dict:
    """Tokens decoded per second (median of `repeats`) on synthetic signals of `positions` positions, in the
    calling thread: a helper for benchmarks (not a test)."""
    rng = np.random.default_rng(seed)
    n, t = positions // 256, 256
    logits = rng.standard_normal((n, t, k)).astype(np.float32) * 2
    logprobs = -np.sort(-logits, -1) - 3.0
    # distinct ids per position, all below vocab_size // 2 (the hybrid tail uses the upper half)
    ids = rng.integers(0, vocab_size // (2 * k), (n, t, 1)) * k + np.arange(k)                        # (n, t, k)
    signal = {"ids": ids, "logprobs": logprobs, "lognorm": rng.standard_normal((n, t)).astype(np.float32)}
    m = min(12, k)
    counts = np.zeros((n, t, m), np.int64)
    counts[..., 0] = samples - (m - 1)
    counts[..., 1:] = 1
    if kind == "sample":
        signal = {"ids": ids[..., :m], "counts": counts}
    elif kind == "hybrid":
        signal.update(tail_ids=ids[..., :m] + vocab_size // 2, tail_counts=counts)
    arrays = encode_signal(kind, signal, vocab_size, value_encoding)
    params = signal_params(kind, vocab_size, value_encoding, k=k, samples=samples)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode_signal(arrays, params)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"kind": kind, "k": k, "value_encoding": value_encoding, "vocab_size": vocab_size,
            "positions": n * t, "seconds": seconds, "tokens_per_s": n * t / seconds}
