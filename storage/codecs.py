"""Encoding of sparse teacher signals into compact arrays, and back. numpy only.

topk signal of n sequences of T positions, K support ids each:
    ids       (n, T, K)  uint16 when the vocabulary fits (V <= 65,536), else int32
    logprobs  (n, T, K)  float16: teacher log-probs (temperature 1) of the support ids, sorted descending
    lognorm   (n, T)     float32: teacher logsumexp over the full vocabulary, so logits = logprobs + lognorm
"""
from __future__ import annotations

import numpy as np

from storage.errors import StoreError

VALUE_DTYPES = ("float16", "float32")


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, lognorm: np.ndarray, vocab_size: int,
                value_dtype: str = "float16") -> dict[str, np.ndarray]:
    if value_dtype not in VALUE_DTYPES:
        raise StoreError(f"unknown value dtype {value_dtype!r}: use one of {VALUE_DTYPES}")
    if ids.shape != logprobs.shape or ids.shape[:-1] != lognorm.shape:
        raise StoreError(f"inconsistent signal shapes ids {ids.shape}, logprobs {logprobs.shape}, "
                         f"lognorm {lognorm.shape}")
    return {"ids": ids.astype(id_dtype(vocab_size)),
            "logprobs": logprobs.astype(value_dtype),
            "lognorm": lognorm.astype(np.float32)}


def decode_topk(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stored arrays -> ids int64, logprobs float32, lognorm float32 (same leading shapes)."""
    return {"ids": arrays["ids"].astype(np.int64),
            "logprobs": arrays["logprobs"].astype(np.float32),
            "lognorm": arrays["lognorm"].astype(np.float32)}
