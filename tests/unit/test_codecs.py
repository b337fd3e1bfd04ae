"""Signal codecs: every kind and value encoding round-trips to the uniform sparse target; id packing; int8 bound."""
import numpy as np
import pytest

from kdcache.storage import StoreError, decode_signal, encode_signal
from kdcache.storage.codecs import (dequantise_logprobs, id_bits, pack_ids, pad_signal, quantise_logprobs, signal_params,
                            stored_arrays, unpack_ids)


def _topk(rng, n=3, t=5, k=6, vocab=1000):
    logits = rng.standard_normal((n, t, vocab)).astype(np.float32) * 3
    lognorm = np.log(np.exp(logits.astype(np.float64)).sum(-1)).astype(np.float32)
    ids = np.argsort(-logits, -1)[..., :k]
    logprobs = np.take_along_axis(logits, ids, -1) - lognorm[..., None]
    return {"ids": ids, "logprobs": logprobs, "lognorm": lognorm}


def _draws(rng, n=3, t=5, m=7, n_draws=20, vocab=1000, exclude=None):
    """Unique ids with counts summing to n_draws at every position, a varying number of slots used."""
    ids = np.zeros((n, t, m), np.int64)
    counts = np.zeros((n, t, m), np.int64)
    for i in np.ndindex(n, t):
        pool = np.setdiff1d(np.arange(vocab), exclude[i] if exclude is not None else [])
        used = rng.integers(1, m + 1)
        ids[i][:used] = rng.choice(pool, used, replace=False)
        cuts = np.sort(rng.choice(np.arange(1, n_draws), used - 1, replace=False))
        counts[i][:used] = np.diff(np.concatenate([[0], cuts, [n_draws]]))
        perm = rng.permutation(m)  # unused slots anywhere: the encoder sorts them away
        ids[i], counts[i] = ids[i][perm], counts[i][perm]
    return ids, counts


@pytest.mark.parametrize("encoding,atol", [("float32", 0), ("float16", 1e-2), ("int8", None)])
@pytest.mark.parametrize("vocab", [1000, 100_000])
def test_topk_round_trip(encoding, atol, vocab):
    rng = np.random.default_rng(0)
    sig = _topk(rng, vocab=1000)
    sig["ids"] = sig["ids"] * (vocab // 1000) + (7 if vocab > 1000 else 0)  # spread over the vocabulary
    arrays = encode_signal("topk", sig, vocab, encoding)
    out = decode_signal(arrays, signal_params("topk", vocab, encoding, k=6))
    assert out["ids"].dtype == np.int64 and out["logprobs"].dtype == np.float32 and out["lognorm"].dtype == np.float32
    np.testing.assert_array_equal(out["ids"], sig["ids"])
    np.testing.assert_array_equal(out["lognorm"], sig["lognorm"])
    if encoding == "int8":  # the documented bound: half a quantisation step
        bound = (sig["logprobs"][..., :1] - sig["logprobs"][..., -1:]) / 510 * (1 + 2**-10) + 1e-6
        assert (np.abs(out["logprobs"] - sig["logprobs"]) <= bound).all()
        np.testing.assert_array_equal(out["logprobs"][..., 0], sig["logprobs"][..., 0])
    else:
        np.testing.assert_allclose(out["logprobs"], sig["logprobs"], atol=atol, rtol=1e-3 if atol else 0)
    assert ("steps" in arrays) == (encoding == "int8")
    assert arrays["ids"].dtype == (np.uint16 if vocab <= 2**16 else np.uint8)
    for name, (dtype, width) in stored_arrays(signal_params("topk", vocab, encoding, k=6)).items():
        assert arrays[name].dtype == np.dtype(dtype) and arrays[name].shape[:2] == (3, 5)
        assert arrays[name].ndim == (2 if width is None else 3) and (width is None or arrays[name].shape[2] == width)


def test_int8_bound_holds_on_wide_and_degenerate_spans():
    rng = np.random.default_rng(1)
    lp = -np.sort(-(-np.abs(rng.standard_normal((2000, 16))) * rng.uniform(0.01, 40, (2000, 1))), -1).astype(np.float32)
    lp[0] = -0.5  # all ties: zero scale
    q = quantise_logprobs(lp)
    back = dequantise_logprobs(q["top1"], q["scale"], q["steps"])
    span = lp[:, 0] - lp[:, -1]
    assert (np.abs(back - lp) <= (span / 510 * (1 + 2**-10) + 1e-5)[:, None]).all()
    assert (np.abs(back - lp) <= q["scale"].astype(np.float32)[:, None] / 2 + 1e-5).all()
    np.testing.assert_array_equal(back[0], lp[0])
    with pytest.raises(StoreError, match="sorted descending"):
        quantise_logprobs(lp[:, ::-1])
    with pytest.raises(StoreError, match="finite"):
        quantise_logprobs(np.array([[0.0, -np.inf]], np.float32))


@pytest.mark.parametrize("vocab", [100_000, 2**17, 2**20 + 3, 2**27])  # 2**27: ids span 5 bytes
def test_bit_packing_round_trip(vocab):
    rng = np.random.default_rng(vocab)
    ids = rng.integers(0, vocab, (4, 7, 13))
    ids[0, 0, 0], ids[0, 0, 1] = 0, vocab - 1
    bits = id_bits(vocab)
    packed = pack_ids(ids, bits)
    assert packed.dtype == np.uint8 and packed.shape == (4, 7, -(-13 * bits // 8))
    np.testing.assert_array_equal(unpack_ids(packed, bits), ids)
    assert bits == {100_000: 17, 2**17: 17, 2**20 + 3: 21, 2**27: 27}[vocab]
    empty = pack_ids(np.zeros((0, 5, 3), np.int64), bits)
    assert unpack_ids(empty, bits, 3).shape == (0, 5, 3)


@pytest.mark.parametrize("vocab", [1000, 100_000])
def test_sample_round_trip_sums_to_one_and_pads_with_first_id(vocab):
    rng = np.random.default_rng(2)
    ids, counts = _draws(rng, n_draws=20, vocab=vocab)
    arrays = encode_signal("sample", {"ids": ids, "counts": counts}, vocab)
    assert arrays["counts"].dtype == np.uint8 and "lognorm" not in arrays
    # one row per sequence, as long as the sequence with the most drawn ids; no slot is spent on padding there
    per_sequence = (counts > 0).sum((1, 2))
    assert arrays["counts"].shape == (3, per_sequence.max())
    np.testing.assert_array_equal((arrays["counts"] > 0).sum(-1), per_sequence)
    np.testing.assert_array_equal(arrays["counts"].astype(int).sum(-1), 5 * 20)  # N draws at each of 5 positions
    out = decode_signal(arrays, signal_params("sample", vocab, samples=20))
    assert out["ids"].shape == (3, 5, (counts > 0).sum(-1).max())  # C = the shard's most unique ids at a position
    with np.errstate(invalid="ignore"):  # -inf - -inf between unused slots
        assert not (np.diff(out["logprobs"], axis=-1) > 0).any()  # most drawn first
    p = np.exp(out["logprobs"].astype(np.float64))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(out["lognorm"], 0)
    empty = np.isneginf(out["logprobs"])
    assert empty.any()
    np.testing.assert_array_equal(out["ids"], np.where(empty, out["ids"][..., :1], out["ids"]))
    for i in np.ndindex(3, 5):  # the same multiset of (id, count) as the input
        want = {int(a): int(c) for a, c in zip(ids[i], counts[i]) if c}
        got = {int(a): round(float(q) * 20) for a, q, e in zip(out["ids"][i], p[i], empty[i]) if not e}
        assert got == want
    damaged = {**arrays, "counts": arrays["counts"].copy()}
    damaged["counts"][1, 0] += 1  # position boundaries come from the counts: a wrong sum is refused, not misread
    with pytest.raises(StoreError, match="do not sum to N = 20"):
        decode_signal(damaged, signal_params("sample", vocab, samples=20))
    with_norm = encode_signal("sample", {"ids": ids, "counts": counts, "lognorm": np.ones((3, 5))}, vocab)
    np.testing.assert_array_equal(decode_signal(with_norm, signal_params("sample", vocab, samples=20))["lognorm"], 1)


@pytest.mark.parametrize("encoding", ["float16", "int8"])
def test_hybrid_round_trip_exact_peaks_and_unbiased_tail_weights(encoding):
    rng = np.random.default_rng(3)
    sig = _topk(rng)
    tail_ids, tail_counts = _draws(rng, n_draws=10, exclude=sig["ids"])
    arrays = encode_signal("hybrid", {**sig, "tail_ids": tail_ids, "tail_counts": tail_counts}, 1000, encoding)
    out = decode_signal(arrays, signal_params("hybrid", 1000, encoding, k=6, samples=10))
    np.testing.assert_allclose(out["lognorm"], sig["lognorm"])  # kept when given
    without = encode_signal("hybrid", {**sig, "lognorm": None, "tail_ids": tail_ids, "tail_counts": tail_counts},
                            1000, encoding)
    assert "lognorm" not in without  # what precompute writes: the estimate sums to 1 without it
    lean = decode_signal(without, signal_params("hybrid", 1000, encoding, k=6, samples=10))
    np.testing.assert_array_equal(lean["lognorm"], np.zeros((3, 5), np.float32))
    np.testing.assert_array_equal(lean["logprobs"], out["logprobs"])
    m = (tail_counts > 0).sum(-1).max()
    assert out["ids"].shape == (3, 5, 6 + m)
    np.testing.assert_array_equal(out["ids"][..., :6], sig["ids"])
    p = np.exp(out["logprobs"].astype(np.float64))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    top = np.exp(out["logprobs"][..., :6].astype(np.float64)).sum(-1)
    tail_p = p[..., 6:]
    np.testing.assert_allclose(tail_p.sum(-1), 1 - top, rtol=1e-5)
    # each tail weight is r * count / N, for the same (id, count) pairs as drawn
    for i in np.ndindex(3, 5):
        want = {int(a): (1 - top[i]) * c / 10 for a, c in zip(tail_ids[i], tail_counts[i]) if c}
        got = {int(a): q for a, q in zip(out["ids"][i][6:], tail_p[i]) if q > 0}
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[a] for a in want], list(want.values()), rtol=1e-5)
    unused = np.isneginf(out["logprobs"])
    assert unused.any() and (out["ids"][unused] == np.broadcast_to(out["ids"][..., :1], out["ids"].shape)[unused]).all()


def test_bad_signals_are_refused_with_one_line_errors():
    rng = np.random.default_rng(4)
    ids, counts = _draws(rng, n_draws=20)
    with pytest.raises(StoreError, match="unknown signal kind 'dense'"):
        encode_signal("dense", {}, 100)
    with pytest.raises(StoreError, match="unknown value encoding 'int4'"):
        encode_signal("topk", _topk(rng), 1000, "int4")
    with pytest.raises(StoreError, match="sample signal lacks counts"):
        encode_signal("sample", {"ids": ids}, 1000)
    with pytest.raises(StoreError, match="same N"):
        encode_signal("sample", {"ids": ids, "counts": counts * 13}, 1000)  # N = 260 > 255
    uneven = counts.copy()
    uneven[0, 0, np.argmax(uneven[0, 0])] += 1
    with pytest.raises(StoreError, match="got sums 20..21"):
        encode_signal("sample", {"ids": ids, "counts": uneven}, 1000)
    dup = ids.copy()
    order = np.argsort(-counts[0, 0])
    dup[0, 0, order[1]] = dup[0, 0, order[0]]
    c2 = counts.copy()
    c2[0, 0] = 0
    c2[0, 0, order[0]], c2[0, 0, order[1]] = 10, 10
    with pytest.raises(StoreError, match="appears twice"):
        encode_signal("sample", {"ids": dup, "counts": c2}, 1000)
    sig = _topk(rng)
    overlap_ids = np.broadcast_to(sig["ids"][..., :1], (3, 5, 1)).copy()
    with pytest.raises(StoreError, match="hybrid tail_ids and ids"):
        encode_signal("hybrid", {**sig, "tail_ids": overlap_ids, "tail_counts": np.full((3, 5, 1), 5)}, 1000)
    with pytest.raises(StoreError, match="out of range"):
        encode_signal("topk", {**sig, "ids": sig["ids"] + 1000}, 1000)
    with pytest.raises(StoreError, match="inconsistent signal shapes"):
        encode_signal("topk", {**sig, "lognorm": sig["lognorm"][:, :2]}, 1000)


def test_zero_size_shard_encodes_and_decodes():
    for kind, sig in [("topk", {"ids": np.zeros((0, 4, 3), int), "logprobs": np.zeros((0, 4, 3)),
                                "lognorm": np.zeros((0, 4))}),
                      ("sample", {"ids": np.zeros((0, 4, 2), int), "counts": np.zeros((0, 4, 2), int)})]:
        for encoding in ("float16", "int8"):
            for vocab in (1000, 100_000):
                out = decode_signal(encode_signal(kind, sig, vocab, encoding),
                                    {**signal_params(kind, vocab, encoding, k=3, samples=5), "seq_len": 4})
                assert out["ids"].shape[:2] == (0, 4) and out["lognorm"].shape == (0, 4)


def test_pad_signal_adds_unused_slots_and_missing_samples_is_refused():
    rng = np.random.default_rng(5)
    ids, counts = _draws(rng, n_draws=20)
    arrays = encode_signal("sample", {"ids": ids, "counts": counts}, 1000)
    out = decode_signal(arrays, signal_params("sample", 1000, samples=20))
    wide = pad_signal(out, out["ids"].shape[-1] + 3)
    assert wide["ids"].shape == (3, 5, out["ids"].shape[-1] + 3)
    assert np.isneginf(wide["logprobs"][..., -3:]).all() and (wide["ids"][..., -3:] == out["ids"][..., :1]).all()
    np.testing.assert_array_equal(wide["logprobs"][..., :out["ids"].shape[-1]], out["logprobs"])
    with pytest.raises(StoreError, match="cannot pad"):
        pad_signal(out, 1)
    with pytest.raises(StoreError, match="needs params.samples"):
        decode_signal(arrays, signal_params("sample", 1000))
