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
    lognorm       (n, T)     float32 (topk; optional for sample and hybrid, whose estimates sum to 1 without it)
    ids, counts   (n, L)     (sample) one row per sequence: the unique drawn ids (uint16, or bit-packed as above)
                             and their uint8 counts, position after position, most drawn first within a
                             position; a position's counts sum to N, which is how a reader finds where it ends.
                             L = the most entries of any sequence of the shard; shorter rows end in count 0.
    tail_ids, tail_counts    (hybrid): like ids/counts of `sample`, draws from the tail renormalised

Decoded (`decode_signal`), the same for every kind:
    ids (n, T, C) int64, logprobs (n, T, C) float32 (estimate of the teacher log-prob over the FULL vocabulary,
    -inf = no entry; such slots repeat the row's first id), lognorm (n, T) float32 (zeros when not stored).
    For sampled kinds C = the most unique ids at any position of the shard.
"""
from __future__ import annotations

import numpy as np

from kdcache.storage.errors import StoreError

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
    if ids.size == 0:
        return np.zeros((*lead, -(-c * bits // 8)), np.uint8)
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
    if packed.size == 0:
        return np.zeros((*lead, c), np.int64)
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
    """ids, counts (n, T, M) -> each sequence's drawn ids and uint8 counts as one row, position after position,
    most drawn first within a position: stored ids, counts (n, L), L = the most entries of any sequence here.

    No array says where a position's entries end: its counts sum to N, so entry e belongs to position
    (cumsum(counts)[e] - 1) // N of its row. Rows shorter than L end in unused slots (id 0, count 0).
    Measured on the default teacher (sample N=32, 12.9 unique ids/position): 24.5 B/token against 30.2 for the
    (n, T, M) layout padded to the shard's largest M, whose zero runs cost zstd ~0.3 B per unused slot."""
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
    used = counts > 0                                                                             # (n, T, M)
    _check_unique(ids, used, f"{prefix}ids")
    n = ids.shape[0]
    per_row = used.reshape(n, used[0].size if n else 0).sum(-1)                                   # (n,)
    width = int(per_row.max()) if n else 0
    row = np.repeat(np.arange(n), per_row)                                                        # (E,)
    col = np.arange(row.size) - np.repeat(np.cumsum(per_row) - per_row, per_row)                  # (E,)
    row_ids = np.zeros((n, width), np.int64)
    row_counts = np.zeros((n, width), np.uint8)
    row_ids[row, col] = ids[used]  # boolean indexing walks (sequence, position, slot) in order
    row_counts[row, col] = counts[used]
    return {f"{prefix}ids": encode_ids(row_ids, vocab_size), f"{prefix}counts": row_counts}


with np.errstate(divide="ignore"):
    _LOG_COUNT = np.log(np.arange(MAX_SAMPLES + 1, dtype=np.float64)).astype(np.float32)  # log 0 = -inf: unused


def _decode_counts(stored_ids: np.ndarray, counts: np.ndarray, seq_len: int, n_draws: int, vocab_size: int,
                   weight: np.ndarray | None = None, first: np.ndarray | None = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `_encode_counts` -> ids (n, T, M) int64 and log(weight * count / N) (n, T, M) float32, M = the most
    entries at any position; unused slots get logprob -inf and the id `first` (n, T) (default: the position's
    first entry), so they never alias a real id. weight (n, T) or None."""
    n, width = counts.shape
    row_ids = decode_ids(stored_ids, vocab_size, width)                                           # (n, L)
    used = counts > 0                                                                             # (n, L)
    cumulative = np.cumsum(counts, axis=-1, dtype=np.int64)                                       # (n, L)
    if n and width and (cumulative[:, -1] != seq_len * n_draws).any():
        raise StoreError(f"sampled counts do not sum to N = {n_draws} at each of the {seq_len} positions of "
                         "every sequence: the shard is damaged or was written with other params")
    position = (np.arange(n)[:, None] * seq_len + (cumulative - 1) // n_draws)[used]              # (E,)
    per_position = np.bincount(position, minlength=n * seq_len)                                   # (n*T,)
    m = int(per_position.max()) if per_position.size else 0
    if per_position.size and per_position.min() == 0:
        raise StoreError("a position has no sampled entry: the shard is damaged")
    starts = np.cumsum(per_position) - per_position                                               # (n*T,)
    flat = position * m + (np.arange(position.size) - starts[position])                           # (E,) slot index
    entry_ids, entry_counts = row_ids[used], counts[used]                                         # (E,)
    if first is None:
        first = entry_ids[starts]                                                                 # (n*T,)
    ids = np.repeat(np.asarray(first, np.int64).reshape(-1), m)                                   # (n*T*M,)
    ids[flat] = entry_ids
    logprobs = np.full(n * seq_len * m, -np.inf, np.float32)                                      # (n*T*M,)
    entry_logprobs = _LOG_COUNT[entry_counts] - np.log(np.float32(n_draws))                       # (E,)
    if weight is not None:
        with np.errstate(divide="ignore"):
            entry_logprobs += np.log(weight.astype(np.float32)).reshape(-1)[position]
    logprobs[flat] = entry_logprobs
    return ids.reshape(n, seq_len, m), logprobs.reshape(n, seq_len, m)


# ---- the public codec ------------------------------------------------------------------------------------------

def _check_shapes(signal: dict, required: tuple[str, ...], kind: str) -> None:
    missing = [name for name in required if name not in signal]
    if missing:
        raise StoreError(f"{kind} signal lacks {', '.join(missing)} (needs {', '.join(required)})")


def _encode_topk_part(signal: dict, vocab_size: int, value_encoding: str) -> dict[str, np.ndarray]:
    """ids, logprobs (n, T, k) and, when given, lognorm (n, T) -> stored arrays."""
    ids, logprobs = np.asarray(signal["ids"]), np.asarray(signal["logprobs"])
    lognorm = np.asarray(signal["lognorm"]) if signal.get("lognorm") is not None else None
    if ids.shape != logprobs.shape or ids.ndim != 3 or (lognorm is not None and ids.shape[:-1] != lognorm.shape):
        raise StoreError(f"inconsistent signal shapes ids {ids.shape}, logprobs {logprobs.shape}, "
                         f"lognorm {None if lognorm is None else lognorm.shape} (want (n, T, k), (n, T, k), (n, T))")
    out = {"ids": encode_ids(ids, vocab_size), **_encode_values(logprobs, value_encoding)}
    if lognorm is not None:
        out["lognorm"] = lognorm.astype(np.float32)
    return out


def encode_signal(kind: str, signal: dict[str, np.ndarray], vocab_size: int, value_encoding: str = "float16",
                  ) -> dict[str, np.ndarray]:
    """kind topk:   signal = {ids (n,T,k) int, logprobs (n,T,k) float, lognorm (n,T) float}
       kind sample: signal = {ids (n,T,M) int, counts (n,T,M) int (0 = unused slot)}  [+ optional lognorm]
       kind hybrid: signal = {ids, logprobs (top-k part), tail_ids (n,T,M), tail_counts (n,T,M)} [+ optional lognorm]
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
            if lognorm.shape != np.shape(signal["counts"])[:-1]:
                raise StoreError(f"sample lognorm {lognorm.shape} must be (n, T) = {np.shape(signal['counts'])[:-1]}")
            out["lognorm"] = lognorm
        return out
    _check_shapes(signal, ("ids", "logprobs", "tail_ids", "tail_counts"), kind)
    out = _encode_topk_part(signal, vocab_size, value_encoding)
    top_ids, tail_ids, tail_counts = (np.asarray(signal[k]) for k in ("ids", "tail_ids", "tail_counts"))
    if tail_counts.shape[:-1] != top_ids.shape[:-1]:
        raise StoreError(f"hybrid tail {tail_counts.shape[:-1]} and top-k {top_ids.shape[:-1]} positions differ")
    used = np.concatenate([np.ones(top_ids.shape, bool), tail_counts > 0], -1)
    _check_unique(np.concatenate([top_ids, tail_ids], -1).astype(np.int64), used, "hybrid tail_ids and ids")
    return {**out, **_encode_counts(tail_ids, tail_counts, vocab_size, "tail_")}


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
        counts = arrays["counts"]                                                                   # (n, L)
        seq_len = _sampled_seq_len(counts, params, arrays.get("lognorm"))
        ids, logprobs = _decode_counts(arrays["ids"], counts, seq_len, params["samples"], vocab_size)
        lognorm = arrays["lognorm"].astype(np.float32) if "lognorm" in arrays else np.zeros(ids.shape[:-1], np.float32)
        return {"ids": ids, "logprobs": logprobs, "lognorm": lognorm}
    logprobs = _decode_values(arrays, value_encoding)                                              # (n, T, k)
    ids = decode_ids(arrays["ids"], vocab_size, logprobs.shape[-1])                                 # (n, T, k)
    if "lognorm" in arrays or kind == "topk":  # topk always stores it; sampled kinds only when asked to
        lognorm = arrays["lognorm"].astype(np.float32)                                              # (n, T)
    else:
        lognorm = np.zeros(logprobs.shape[:-1], np.float32)
    if kind == "topk":
        return {"ids": ids, "logprobs": logprobs, "lognorm": lognorm}
    residual = np.clip(1.0 - np.exp(logprobs).sum(-1, dtype=np.float64), 0.0, 1.0)                  # (n, T)
    first = ids[..., 0] if ids.shape[-1] else None
    tail_ids, tail_logprobs = _decode_counts(arrays["tail_ids"], arrays["tail_counts"], lognorm.shape[1],
                                             params["samples"], vocab_size, residual, first)         # (n, T, M) x2
    return {"ids": np.concatenate([ids, tail_ids], -1), "logprobs": np.concatenate([logprobs, tail_logprobs], -1),
            "lognorm": lognorm}


def _sampled_seq_len(counts: np.ndarray, params: dict, lognorm: np.ndarray | None) -> int:
    """Positions per sequence of a sample shard: from its lognorm or the manifest when they say, else from the
    counts (each row holds seq_len * N draws)."""
    if lognorm is not None:
        return lognorm.shape[1]
    if isinstance(params.get("seq_len"), int):
        return params["seq_len"]
    if counts.shape[0] == 0:
        return 0
    return int(counts[0].sum(dtype=np.int64)) // params["samples"]


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


def sample_draws(params: dict) -> str:
    """How a sampled store drew its N draws: params.draws, iid for stores written before `draws` existed."""
    return params.get("draws") or "iid"


ROWS = "rows"  # a stored_arrays width: an (n, L) array of one row per sequence, L shard-dependent


def stored_arrays(params: dict) -> dict[str, tuple[str, int | str | None]]:
    """name -> (dtype, trailing size: None for (n, T) arrays, k for (n, T, k), ROWS for (n, L) rows of drawn
    ids/counts) for a store's params: what `kdcache verify` expects to find in every shard."""
    kind, vocab_size = params.get("signal", "topk"), params["vocab_size"]
    encoding = params.get("value_encoding", params.get("value_dtype", "float16"))
    id_dt = signal_id_dtype(vocab_size).name
    out: dict[str, tuple[str, int | str | None]] = {}
    if kind in ("topk", "hybrid"):
        k = params["k"]
        out["ids"] = (id_dt, -(-k * id_bits(vocab_size) // 8) if ids_packed(vocab_size) else k)
        if encoding == "int8":
            out.update(top1=("float32", None), scale=("float16", None), steps=("uint8", k - 1))
        else:
            out["logprobs"] = (encoding, k)
        if kind == "topk":  # the sampled kinds' estimates sum to 1 without it: optional there
            out["lognorm"] = ("float32", None)
    if kind == "sample":
        out.update(ids=(id_dt, ROWS), counts=("uint8", ROWS))
    if kind == "hybrid":
        out.update(tail_ids=(id_dt, ROWS), tail_counts=("uint8", ROWS))
    return out
