"""Signal kinds sample / hybrid: extraction, seeding, unused slots in every loss, unbiasedness of the gradient."""
import hashlib

import numpy as np
import pytest
import torch

from kdcache.stages.data import stack_sequences
from kdcache.stages.losses import LOSS_NAMES, TAIL_MODES, ObjectiveSpec, SparseTarget, compute_objective
from kdcache.stages.signals import concat_signals, hybrid_signal, sample_signal, shard_generator, sparse_target, topk_signal
from kdcache.storage import decode_signal, encode_signal

V = 40


def _decoded(kind, signal, samples, k=None, encoding="float32"):
    params = {"signal": kind, "vocab_size": V, "value_encoding": encoding, "k": k, "samples": samples}
    return decode_signal(encode_signal(kind, signal, V, encoding), params)


# ---- extraction -------------------------------------------------------------------------------------------

def test_sample_signal_is_unique_ids_with_counts_summing_to_n():
    logits = torch.randn(3, 7, V) * 2                                          # (B, T, V)
    ids, counts = sample_signal(logits, 30, shard_generator(0, "train-00000"))
    assert ids.shape == counts.shape and ids.shape[:2] == (3, 7)
    assert (counts.sum(-1) == 30).all()
    used = counts > 0
    assert used.sum(-1).max() == ids.shape[-1]                                 # padded to the batch's widest row
    assert (ids[~used] == 0).all()
    for row_ids, row_used in zip(ids.reshape(-1, ids.shape[-1]), used.reshape(-1, ids.shape[-1])):
        assert len(set(row_ids[row_used].tolist())) == int(row_used.sum())


def test_sample_frequencies_estimate_the_teacher_distribution():
    logits = torch.randn(2, V) * 1.5
    ids, counts = sample_signal(logits, 40_000, shard_generator(3, "s"))
    freq = torch.zeros(2, V, dtype=torch.float64).scatter_add_(-1, ids, counts.double()) / 40_000
    p = torch.softmax(logits.double(), -1)
    sigma = (p * (1 - p) / 40_000).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-4).all()


def test_systematic_counts_are_floor_or_ceil_of_n_p_and_unbiased():
    logits = torch.randn(4000, V) * 2                                          # (R, V) many positions
    ids, counts = sample_signal(logits, 24, shard_generator(0, "s"), draws="systematic")
    assert (counts.sum(-1) == 24).all()
    per_id = torch.zeros(4000, V, dtype=torch.long).scatter_add_(-1, ids, counts)  # (R, V)
    expected = 24 * torch.softmax(logits.double(), -1)                          # (R, V)
    assert ((per_id - expected).abs() < 1 + 1e-6).all()  # every id: floor(N p) or ceil(N p), never further
    assert (per_id[expected >= 1] > 0).all()             # so an id with p >= 1/N is always drawn
    # unbiased: over the rows, the mean count of each id matches N p within the sampling error of a mean
    bias = (per_id.double() - expected).mean(0)                                   # (V,)
    assert bias.abs().max() < 5 * 0.5 / 4000 ** 0.5
    iid = sample_signal(logits, 24, shard_generator(0, "s"))
    iid_per_id = torch.zeros(4000, V, dtype=torch.long).scatter_add_(-1, iid[0], iid[1])
    spread = lambda c: float(((c.double() - expected) ** 2).mean())               # noqa: E731
    assert spread(per_id) < 0.5 * spread(iid_per_id)  # the point of it: far less noise than iid draws


def test_systematic_draws_are_seeded_and_reach_the_hybrid_tail():
    logits = torch.randn(2, 5, V)
    a = sample_signal(logits, 16, shard_generator(0, "train-00001"), draws="systematic")
    b = sample_signal(logits, 16, shard_generator(0, "train-00001"), draws="systematic")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    *_, tail_ids, tail_counts = hybrid_signal(logits, 3, 16, shard_generator(0, "x"), draws="systematic")
    top = logits.topk(3, -1).indices
    assert (tail_counts.sum(-1) == 16).all()
    assert not ((tail_ids[..., :, None] == top[..., None, :]).any(-1) & (tail_counts > 0)).any()
    with pytest.raises(ValueError, match="unknown draws"):
        sample_signal(logits, 16, shard_generator(0, "x"), draws="stratified")


def test_hybrid_is_exact_topk_plus_draws_from_the_residual_only():
    logits = torch.randn(2, 3, V) * 2
    ids, logprobs, lognorm, tail_ids, tail_counts = hybrid_signal(logits, 5, 20_000, shard_generator(0, "x"))
    want = topk_signal(logits, 5)
    for got, exp in zip((ids, logprobs, lognorm), want):
        torch.testing.assert_close(got, exp)
    used = tail_counts > 0
    assert not ((tail_ids[..., :, None] == ids[..., None, :]).any(-1) & used).any()  # never a top-k id
    assert (tail_counts.sum(-1) == 20_000).all()
    residual = torch.softmax(logits.double().scatter(-1, ids, -torch.inf), -1)  # (B, T, V)
    freq = torch.zeros_like(residual).scatter_add_(-1, tail_ids, tail_counts.double()) / 20_000
    assert (freq - residual).abs().max() < 0.02


def test_hybrid_survives_a_topk_holding_all_float32_mass():
    logits = torch.full((1, 2, V), -200.0)
    logits[..., :3] = 0.0                                                       # tail probs underflow to 0
    *_, tail_ids, tail_counts = hybrid_signal(logits, 3, 8, shard_generator(0, "x"))
    assert (tail_counts.sum(-1) == 8).all() and (tail_ids[tail_counts > 0] >= 3).all()


def test_sampling_is_seeded_per_shard_and_reproducible():
    logits = torch.randn(2, 5, V)
    a = sample_signal(logits, 16, shard_generator(0, "train-00001"))
    b = sample_signal(logits, 16, shard_generator(0, "train-00001"))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for other in (shard_generator(1, "train-00001"), shard_generator(0, "train-00002")):
        c = sample_signal(logits, 16, other)
        assert not (c[0].shape == a[0].shape and torch.equal(c[0], a[0]) and torch.equal(c[1], a[1]))


def test_shard_seed_is_a_sha256_of_seed_and_shard_name():
    # not Python's hash(), which is salted per process: every worker and every rerun must draw the same stream
    digest = hashlib.sha256(b"7\0train-00003").digest()
    want = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    assert torch.equal(torch.randint(0, 2**62, (4,), generator=shard_generator(7, "train-00003")),
                       torch.randint(0, 2**62, (4,), generator=want))


def test_concat_signals_pads_sampled_arrays_to_the_shard_width():
    a = {"ids": np.ones((1, 2, 3), np.int64), "counts": np.full((1, 2, 3), 2)}
    b = {"ids": np.ones((2, 2, 5), np.int64), "counts": np.full((2, 2, 5), 1)}
    out = concat_signals("sample", [a, b])
    assert out["ids"].shape == (3, 2, 5) and (out["counts"][0, :, 3:] == 0).all()
    assert (out["counts"][1:] == 1).all()


def test_stack_sequences_pads_signals_of_different_widths_as_unused_slots():
    s1 = {"input_ids": np.arange(2), "sig_ids": np.array([[5, 6], [7, 8]]),
          "sig_logprobs": np.array([[-0.1, -2.0], [-0.5, -1.0]], np.float32), "sig_lognorm": np.zeros(2, np.float32)}
    s2 = {"input_ids": np.arange(2), "sig_ids": np.array([[1, 2, 3], [4, 9, 10]]),
          "sig_logprobs": np.full((2, 3), -1.1, np.float32), "sig_lognorm": np.zeros(2, np.float32)}
    batch = stack_sequences([s1, s2])
    assert batch["sig_ids"].shape == (2, 2, 3)
    np.testing.assert_array_equal(batch["sig_ids"][0, :, 2], [5, 7])            # the row's first id
    assert np.isneginf(batch["sig_logprobs"][0, :, 2]).all()


# ---- unused slots contribute nothing, in every loss --------------------------------------------------------

def _ragged_target(n_rows, width, seed=0):
    """A batched target whose rows use 1..width slots (the rest: first id, -inf), and each row's own target."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:width] for _ in range(n_rows)])   # (N, C)
    sizes = [1 + (3 * i) % width for i in range(n_rows)]
    sizes[0] = width                                                            # one row without unused slots
    logprobs = torch.log_softmax(torch.randn(n_rows, V, generator=g, dtype=torch.float64) * 2, -1)
    logprobs = logprobs.gather(-1, ids)                                         # (N, C)
    rows = [SparseTarget(ids[i:i + 1, :n], logprobs[i:i + 1, :n], torch.zeros(1, dtype=torch.float64))
            for i, n in enumerate(sizes)]
    unused = torch.arange(width)[None, :] >= torch.tensor(sizes)[:, None]      # (N, C)
    batched = SparseTarget(torch.where(unused, ids[:, :1], ids), logprobs.masked_fill(unused, -torch.inf),
                           torch.zeros(n_rows, dtype=torch.float64))
    return batched, rows


@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_unused_slots_change_no_loss_value_or_gradient(name, tail):
    n_rows, width = 7, 9
    batched, rows = _ragged_target(n_rows, width)
    torch.manual_seed(1)
    logits = (torch.randn(n_rows, V, dtype=torch.float64) * 2).requires_grad_(True)
    labels = torch.randint(0, V, (n_rows,))
    for temperature in (1.0, 2.0):
        spec = ObjectiveSpec(name=name, tail=tail, temperature=temperature, rlkd_k=5)
        mask = torch.ones(n_rows, dtype=torch.bool)
        out = compute_objective(logits, batched, labels, mask, spec, taid_t=0.6)
        grad, = torch.autograd.grad(out["loss_sum"], logits)
        assert torch.isfinite(out["loss_sum"]) and torch.isfinite(grad).all()
        want_value, want_grad = 0.0, torch.zeros_like(grad)
        for i, row in enumerate(rows):
            part = compute_objective(logits[i:i + 1], row, labels[i:i + 1], mask[:1], spec, taid_t=0.6)
            g, = torch.autograd.grad(part["loss_sum"], logits)
            want_value, want_grad = want_value + part["loss_sum"], want_grad + g
        torch.testing.assert_close(out["loss_sum"], want_value, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-9)


def test_agreement_metrics_ignore_unused_slots():
    batched, rows = _ragged_target(5, 8)
    logits = torch.randn(5, V, dtype=torch.float64)
    labels, mask = torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.bool)
    out = compute_objective(logits, batched, labels, mask, ObjectiveSpec(name="kl"))
    top1 = sum(float(compute_objective(logits[i:i + 1], r, labels[:1], mask[:1], ObjectiveSpec(name="kl"))["top1_agree"])
               for i, r in enumerate(rows))
    assert float(out["top1_agree"]) == top1


# ---- sampled targets give unbiased gradients ----------------------------------------------------------------

def _mean_gradient(target_fn, student, replicates, tail="bucket"):
    """Mean over `replicates` independent signals of the bucket-KL logit gradient, per position."""
    n, v = student.shape
    z = student.repeat(replicates, 1).requires_grad_(True)                      # (R * n, V)
    target = target_fn(replicates)
    from kdcache.stages.losses.divergences import divergence_rows
    divergence_rows("kl", z, target, tail=tail).sum().backward()
    return z.grad.reshape(replicates, n, v).mean(0)                             # (n, V)


@pytest.mark.parametrize("kind", ["sample", "hybrid"])
def test_sampled_kinds_give_the_dense_gradient_in_expectation(kind):
    torch.manual_seed(0)
    teacher = torch.randn(4, V, dtype=torch.float64) * 2                        # (n, V)
    student = torch.randn(4, V, dtype=torch.float64)
    dense = torch.softmax(student, -1) - torch.softmax(teacher, -1)              # q - p, the full-KD gradient

    def target_fn(replicates):
        logits = teacher.float().repeat(replicates, 1)[None]                    # (1, R * n, V)
        g = shard_generator(0, f"{kind}-{replicates}")
        if kind == "sample":
            ids, counts = sample_signal(logits, 16, g)
            signal = {"ids": ids.numpy(), "counts": counts.numpy()}
        else:
            ids, logprobs, lognorm, tail_ids, tail_counts = hybrid_signal(logits, 3, 16, g)
            signal = {"ids": ids.numpy(), "logprobs": logprobs.numpy(), "lognorm": lognorm.numpy(),
                      "tail_ids": tail_ids.numpy(), "tail_counts": tail_counts.numpy()}
        dec = _decoded(kind, signal, 16, k=3 if kind == "hybrid" else None)
        return sparse_target(*(torch.from_numpy(dec[k]) for k in ("ids", "logprobs", "lognorm")))

    errors = [float((_mean_gradient(target_fn, student, r) - dense).abs().max()) for r in (16, 4096)]
    assert errors[1] < 0.01                                                     # ~4 sigma at R = 4096, N = 16
    assert errors[1] < errors[0] / 4                                            # shrinks like 1/sqrt(R)
    # renorm renormalises the student over the drawn ids: biased, it does not converge to q - p
    biased = float((_mean_gradient(target_fn, student, 4096, tail="renorm") - dense).abs().max())
    assert biased > 5 * errors[1]


def test_objectives_that_need_exact_peaks_warn_on_a_sampled_cache():
    from types import SimpleNamespace

    from kdcache.stages.train import peaks_note

    def store(kind, **params):
        return SimpleNamespace(path="RUN/signals/teacher", manifest=SimpleNamespace(params={"signal": kind, **params}))

    for loss in ("taid", "rlkd", "rlkd+kl"):
        note = peaks_note(loss, store("sample"))
        assert note is not None and "precompute.signal=topk" in note and "\n" not in note
        assert peaks_note(loss, store("topk")) is None and peaks_note(loss, store("hybrid")) is None
    assert peaks_note("kl", store("sample")) is None
    # the advice is the pair of commands that works in the same run folder (run in tests/integration)
    assert ("`kdcache precompute --source topk -s precompute.signal=topk` then `kdcache train --loss rlkd+kl "
            "-s train.source=topk -s train.output=rlkd`") in peaks_note("rlkd+kl", store("sample"))
    assert "-s train.output=taid-topk`" in peaks_note("taid", store("sample"), output="taid")   # not itself
    member = peaks_note("taid", store("sample", source="helper", teacher="/m/helper"))
    assert "`kdcache precompute --source helper-topk --model /m/helper -s precompute.signal=topk`" in member
