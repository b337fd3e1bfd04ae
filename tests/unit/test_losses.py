"""KL family, CE, tails, temperature, masking, chunking and compute_objective.

Dense references are written out independently here (full-vocab formulas), not by calling the code under test.
Gradients are compared in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.stages.losses import (LOSS_NAMES, TAIL_MODES, ObjectiveSpec, SparseTarget, ce, chunked_sum, compute_objective,
                           jsd, kl, rkl, skl, srkl, tvd)
from kdcache.stages.losses.divergences import aligned_logprobs
from kdcache.stages.losses.support import support_logsumexp
from kdcache.stages.losses.targets import TAIL_FLOOR, teacher_support

N, V, K = 7, 60, 8
DIVERGENCE_FNS = {"kl": kl, "rkl": rkl, "jsd": jsd, "tvd": tvd, "skl": skl, "srkl": srkl}


def make_logits(seed: int, n: int = N, v: int = V, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=dtype) * scale


def sparse_from_dense(teacher: torch.Tensor, k: int, shuffle: bool = False) -> SparseTarget:
    """Top-k sparse target from dense teacher logits, in the teacher's dtype; shuffle the support order per row."""
    lognorm = torch.logsumexp(teacher, dim=-1)                                # (N,)
    values, ids = torch.topk(teacher, k, dim=-1)                              # (N, k)
    if shuffle:
        g = torch.Generator().manual_seed(123)
        perm = torch.stack([torch.randperm(k, generator=g) for _ in range(teacher.shape[0])])  # (N, k)
        values, ids = values.gather(-1, perm), ids.gather(-1, perm)
    return SparseTarget(ids=ids, logprobs=values - lognorm[:, None], lognorm=lognorm)


def all_rows(n: int = N) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool)


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Full-distribution KL(p || q) summed over rows, 0 log 0 = 0."""
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum()


def ref_divergence(name: str, p: torch.Tensor, q: torch.Tensor, beta=0.5, alpha=0.1) -> torch.Tensor:
    if name == "kl":
        return ref_kl(p, q)
    if name == "rkl":
        return ref_kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum()
    if name == "skl":
        return ref_kl(p, alpha * p + (1 - alpha) * q)
    if name == "srkl":
        return ref_kl(q, alpha * q + (1 - alpha) * p)
    raise KeyError(name)


def value_and_grad(fn, z: torch.Tensor):
    z = z.detach().clone().requires_grad_(True)
    value = fn(z)
    value.backward()
    return value.detach(), z.grad


# -------------------------------------------------------------------------------------------- dense references

@pytest.mark.parametrize("name", list(DIVERGENCE_FNS))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dense_divergence_matches_reference_formula(name, temperature):
    z, teacher = make_logits(0), make_logits(1)
    loss, n = DIVERGENCE_FNS[name](z, teacher, all_rows(), temperature=temperature)
    p, q = torch.softmax(teacher / temperature, -1), torch.softmax(z / temperature, -1)
    assert int(n) == N
    torch.testing.assert_close(loss, ref_divergence(name, p, q) * temperature ** 2)


def test_ce_matches_torch_cross_entropy():
    z = make_logits(0)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    loss, n = ce(z, labels, all_rows())
    torch.testing.assert_close(loss, F.cross_entropy(z, labels, reduction="sum"))
    assert int(n) == N


def test_identical_distributions_give_zero_divergence():
    z = make_logits(3)
    for name, fn in DIVERGENCE_FNS.items():
        loss, _ = fn(z, z.clone(), all_rows())
        assert abs(float(loss)) < 1e-10, name


# ------------------------------------------------------------------------------------------------ sparse tails

def test_bucket_kl_matches_full_kl_with_student_shaped_teacher_tail():
    """bucket == full-vocab KL when the teacher's tail mass r is spread like the student's tail."""
    z, teacher = make_logits(0), make_logits(1)
    target = sparse_from_dense(teacher, K)
    loss, _ = kl(z, target, all_rows(), tail="bucket")
    q = torch.softmax(z, -1)
    on_support = torch.zeros_like(q, dtype=torch.bool).scatter(-1, target.ids, True)
    p_s = target.logprobs.exp()
    r = 1 - p_s.sum(-1, keepdim=True)
    q_tail = torch.where(on_support, torch.zeros_like(q), q)
    p = q_tail / q_tail.sum(-1, keepdim=True) * r
    p = p.scatter(-1, target.ids, p_s)
    torch.testing.assert_close(loss, ref_kl(p, q))


def test_renorm_kl_matches_kl_of_renormalised_support():
    z, teacher = make_logits(0), make_logits(1)
    target = sparse_from_dense(teacher, K)
    loss, _ = kl(z, target, all_rows(), tail="renorm")
    p = torch.softmax(teacher.gather(-1, target.ids), -1)
    q = torch.softmax(z.gather(-1, target.ids), -1)
    torch.testing.assert_close(loss, ref_kl(p, q))


def test_uniform_kl_matches_full_kl_with_uniform_teacher_tail():
    z, teacher = make_logits(0), make_logits(1)
    target = sparse_from_dense(teacher, K)
    loss, _ = kl(z, target, all_rows(), tail="uniform")
    p_s = target.logprobs.exp()
    r = 1 - p_s.sum(-1, keepdim=True)
    p = (r / (V - K)).expand(N, V).scatter(-1, target.ids, p_s)
    torch.testing.assert_close(loss, ref_kl(p, torch.softmax(z, -1)))


def test_kl_golden_values_by_hand():
    """V = 4, support {0, 1} with p = (0.5, 0.3), r = 0.2; uniform student q = 0.25 each.
    bucket  = 0.5 ln(0.5/0.25) + 0.3 ln(0.3/0.25) + 0.2 ln(0.2/0.5)          = 0.2180119
    uniform = same support terms + 2 * 0.1 ln(0.1/0.25)  (student tail uniform too) = 0.2180119
    renorm  = 0.625 ln(0.625/0.5) + 0.375 ln(0.375/0.5)                       = 0.0315839"""
    target = SparseTarget(ids=torch.tensor([[0, 1]]), logprobs=torch.tensor([[0.5, 0.3]]).log(),
                          lognorm=torch.zeros(1))
    z = torch.zeros(1, 4)
    expected = {"bucket": 0.2180119, "uniform": 0.2180119, "renorm": 0.0315839}
    for tail, value in expected.items():
        assert float(kl(z, target, all_rows(1), tail=tail)[0]) == pytest.approx(value, abs=1e-6), tail


def test_tails_differ_when_support_is_partial():
    """Guards against a mode silently aliasing another."""
    z, target = make_logits(0), sparse_from_dense(make_logits(1), K)
    values = [float(kl(z, target, all_rows(), tail=tail)[0]) for tail in TAIL_MODES]
    assert len({round(v, 6) for v in values}) == 3


@pytest.mark.parametrize("name", list(DIVERGENCE_FNS))
@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_sparse_with_full_support_equals_dense(name, tail, temperature):
    """K = V in a shuffled order: every tail mode must reproduce the dense reference, values and gradients."""
    z, teacher = make_logits(0), make_logits(1)
    target = sparse_from_dense(teacher, V, shuffle=True)
    fn = DIVERGENCE_FNS[name]
    sparse_value, sparse_grad = value_and_grad(lambda x: fn(x, target, all_rows(), tail=tail,
                                                            temperature=temperature)[0], z)
    dense_value, dense_grad = value_and_grad(lambda x: fn(x, teacher, all_rows(), temperature=temperature)[0], z)
    torch.testing.assert_close(sparse_value, dense_value)
    torch.testing.assert_close(sparse_grad, dense_grad)
    assert sparse_grad.abs().sum() > 0


def test_bucket_is_stable_when_student_puts_almost_all_mass_on_support():
    """log(1 - Q_S) must not cancel to log(0) in float32 when Q_S rounds to 1."""
    teacher = make_logits(1)
    target = sparse_from_dense(teacher, K)
    z64 = make_logits(0).scatter_add(-1, target.ids, torch.full((N, K), 40.0, dtype=torch.float64))
    z32 = z64.float().requires_grad_(True)
    target32 = SparseTarget(target.ids, target.logprobs.float(), target.lognorm.float())
    for name, fn in DIVERGENCE_FNS.items():
        loss32, _ = fn(z32, target32, all_rows(), tail="bucket")
        (grad32,) = torch.autograd.grad(loss32, z32)
        loss64, _ = fn(z64, target, all_rows(), tail="bucket")
        assert torch.isfinite(loss32) and torch.isfinite(grad32).all(), name
        assert math.isclose(float(loss32.detach()), float(loss64), rel_tol=1e-3, abs_tol=1e-4), name


def test_tail_floor_keeps_reverse_divergences_finite():
    """A float32 support whose probabilities sum to >= 1 must not give log(0) tails."""
    z = make_logits(0)
    logprobs = torch.log(torch.full((N, K), 1.0 / K, dtype=torch.float64) * (1 + 1e-6))  # sums to 1 + 1e-6
    ids = torch.arange(K).expand(N, K)
    target = SparseTarget(ids, logprobs, torch.zeros(N, dtype=torch.float64))
    logp_s, log_r = teacher_support(target, V, 1.0, torch.float64)
    assert torch.allclose(log_r.exp(), torch.full((N,), TAIL_FLOOR, dtype=torch.float64))
    for tail in ("bucket", "uniform"):
        for fn in (rkl, srkl, jsd):
            assert torch.isfinite(fn(z, target, all_rows(), tail=tail)[0])


def test_support_logsumexp_fused_backward_passes_gradcheck():
    z = make_logits(0, n=4, v=12).requires_grad_(True)
    ids = torch.tensor([[0, 3, 5], [1, 1, 2], [11, 0, 4], [7, 8, 9]])          # row 1 repeats an id
    for tau in (1.0, 0.6):
        assert torch.autograd.gradcheck(lambda x: support_logsumexp(x, ids, tau, torch.float64), (z,))
        z_s, lse, lse_tail = support_logsumexp(z, ids, tau, torch.float64)
        x = z / tau
        torch.testing.assert_close(lse, torch.logsumexp(x, -1))
        torch.testing.assert_close(lse_tail, torch.logsumexp(x.scatter(-1, ids, -math.inf), -1))
        torch.testing.assert_close(z_s, x.gather(-1, ids))
    # low-precision input: computed in float32, gradient returned in the input's dtype
    z16 = z.detach().to(torch.bfloat16).requires_grad_(True)
    z_s, lse, _ = support_logsumexp(z16, ids, 1.0, torch.float32)
    (lse - z_s[:, 0]).sum().backward()
    assert lse.dtype == torch.float32 and z16.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ temperature

def test_temperature_one_uses_stored_values_exactly():
    target = sparse_from_dense(make_logits(1), K)
    logp_s, log_r = teacher_support(target, V, 1.0, torch.float64)
    assert torch.equal(logp_s, target.logprobs)
    torch.testing.assert_close(log_r.exp(), 1 - target.logprobs.exp().sum(-1))
    # the general re-tempering formula is continuous at tau = 1
    near_s, near_r = teacher_support(target, V, 1.0 + 1e-9, torch.float64)
    torch.testing.assert_close(near_s, logp_s)
    torch.testing.assert_close(near_r, log_r)


def test_temperature_tail_assumes_uniform_missing_ids():
    """A dense teacher whose V - K missing ids really share the tail uniformly: the sparse teacher at tau equals
    the dense teacher at tau (support and tail mass), and uniform-tail KL equals dense KL."""
    teacher = make_logits(1)
    target = sparse_from_dense(teacher, K)
    off = torch.ones_like(teacher, dtype=torch.bool).scatter(-1, target.ids, False)
    flat = torch.where(off, torch.full_like(teacher, -1.0), teacher)        # every missing id has logit -1
    target = sparse_from_dense(flat, K)
    z = make_logits(0)
    for tau in (0.5, 3.0):
        logp_s, log_r = teacher_support(target, V, tau, torch.float64)
        dense = torch.log_softmax(flat / tau, -1)                            # (N, V)
        torch.testing.assert_close(logp_s, dense.gather(-1, target.ids))
        torch.testing.assert_close(log_r.exp(), torch.where(off, dense.exp(), 0).sum(-1))
        torch.testing.assert_close(kl(z, target, all_rows(), tail="uniform", temperature=tau)[0],
                                   kl(z, flat, all_rows(), temperature=tau)[0])


def test_temperature_changes_sparse_loss_and_scales_by_tau_squared():
    z, target = make_logits(0), sparse_from_dense(make_logits(1), K)
    base = float(kl(z, target, all_rows())[0])
    hot = float(kl(z, target, all_rows(), temperature=2.0)[0])
    assert not math.isclose(base, hot, rel_tol=1e-3)
    # tau**2 scaling: same tempered distributions, loss scaled by exactly 4
    logp, logq = aligned_logprobs(z, target, temperature=2.0)
    torch.testing.assert_close(torch.tensor(hot, dtype=torch.float64), 4 * ref_kl(logp.exp(), logq.exp()))


# ------------------------------------------------------------------------------------------------ masking

@pytest.mark.parametrize("name", list(DIVERGENCE_FNS))
def test_masked_positions_contribute_exactly_zero(name):
    z, teacher = make_logits(0), make_logits(1)
    target = sparse_from_dense(teacher, K)
    mask = torch.tensor([True, False, True, True, False, True, True])
    # garbage in the masked rows must not leak (NaN teacher, absurd student logits)
    clean = target[mask]
    target.logprobs[~mask] = float("nan")
    z_bad = z.clone()
    z_bad[~mask] = 1e30
    value, grad = value_and_grad(lambda x: DIVERGENCE_FNS[name](x, target, mask)[0], z_bad)
    kept_value, kept_grad = value_and_grad(lambda x: DIVERGENCE_FNS[name](x, clean, all_rows(5))[0], z[mask])
    torch.testing.assert_close(value, kept_value)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    torch.testing.assert_close(grad[mask], kept_grad)
    assert int(DIVERGENCE_FNS[name](z, target, mask)[1]) == 5


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("tail", TAIL_MODES)
def test_every_objective_gives_masked_positions_exactly_zero_value_and_grad(name, tail):
    """Through compute_objective (as the trainer calls it), with garbage in the masked rows (NaN teacher,
    absurd student logits), one chunk wholly masked, and every position masked."""
    z, teacher = make_logits(0), make_logits(1)
    target = sparse_from_dense(teacher, K)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([True, True, False, False, True, False, True])        # chunk (2, 3) is fully masked
    clean = target[mask]
    target.logprobs[~mask] = float("nan")
    z_bad = z.clone()
    z_bad[~mask] = 1e30
    spec = ObjectiveSpec(name=name, tail=tail, chunk_size=2, ce_weight=0.0 if name == "ce" else 0.25)

    def objective(x, tg, m):
        return compute_objective(x, tg, labels[m] if len(x) < N else labels, m if len(x) == N else all_rows(len(x)),
                                 spec, taid_t=0.6)

    value, grad = value_and_grad(lambda x: objective(x, target, mask)["loss_sum"], z_bad)
    kept_value, kept_grad = value_and_grad(lambda x: objective(x, clean, mask)["loss_sum"], z[mask])
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(value, kept_value)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    torch.testing.assert_close(grad[mask], kept_grad)
    assert grad[mask].abs().sum() > 0
    out = objective(z_bad.detach(), target, mask)
    assert int(out["n_tokens"]) == 4
    for part in ("kd_sum", "ce_sum", "rank_sum"):
        if part in out:
            assert torch.isfinite(out[part])
    none = torch.zeros(N, dtype=torch.bool)
    value, grad = value_and_grad(lambda x: objective(x, target, none)["loss_sum"], z_bad)
    assert float(value) == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert int(objective(z_bad.detach(), target, none)["n_tokens"]) == 0


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n != "ce"])
@pytest.mark.parametrize("tail", TAIL_MODES)
def test_every_objective_with_full_support_equals_its_dense_reference(name, tail):
    """K = V (shuffled support): compute_objective on the sparse target equals it on dense teacher logits,
    values and gradients, with a temperature and a CE mix."""
    z, teacher = make_logits(0), make_logits(1)
    target = sparse_from_dense(teacher, V, shuffle=True)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    spec = ObjectiveSpec(name=name, tail=tail, temperature=1.5, ce_weight=0.2, chunk_size=3)
    sparse = value_and_grad(lambda x: compute_objective(x, target, labels, all_rows(), spec, taid_t=0.6)["loss_sum"], z)
    dense = value_and_grad(lambda x: compute_objective(x, teacher, labels, all_rows(), spec, taid_t=0.6)["loss_sum"], z)
    torch.testing.assert_close(sparse[0], dense[0])
    torch.testing.assert_close(sparse[1], dense[1])


# ------------------------------------------------------------------------------------------------ chunking

def test_chunked_sum_slices_tensors_and_targets_and_passes_others():
    z, target = make_logits(0), sparse_from_dense(make_logits(1), K)
    seen = []

    def fn(zc, tc, scale):
        seen.append((zc.shape[0], tc.ids.shape[0], scale))
        return zc.sum() * scale

    total = chunked_sum(fn, N, 3, z, target, 2.0)
    torch.testing.assert_close(total, z.sum() * 2.0)
    assert seen == [(3, 3, 2.0), (3, 3, 2.0), (1, 1, 2.0)]


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_chunked_objective_equals_unchunked(name, chunk_size):
    z, teacher = make_logits(0, n=11), make_logits(1, n=11)
    target = sparse_from_dense(teacher, K)
    labels = torch.randint(0, V, (11,), generator=torch.Generator().manual_seed(0))
    mask = torch.rand(11, generator=torch.Generator().manual_seed(1)) > 0.3

    def run(x, size):
        spec = ObjectiveSpec(name=name, chunk_size=size, ce_weight=0.2 if name != "ce" else 0.0, temperature=1.5)
        return compute_objective(x, target, labels, mask, spec, taid_t=0.6)["loss_sum"]

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # chunks run under checkpoint
        chunked_value, chunked_grad = value_and_grad(lambda x: run(x, chunk_size), z)
    whole_value, whole_grad = value_and_grad(lambda x: run(x, 10_000), z)
    torch.testing.assert_close(chunked_value, whole_value)
    torch.testing.assert_close(chunked_grad, whole_grad)
    assert chunked_grad.abs().sum() > 0


def test_chunking_keeps_no_full_size_intermediate_for_backward():
    """What autograd keeps for backward (beyond the caller's own tensors) must not grow with V: either the
    chunks are checkpointed, or the path is fused / gathered and keeps only (rows, K)-sized tensors."""
    n, chunk = 12, 5

    def saved_numels(name, tail, dense, v, partial_mask=False):
        z = make_logits(0, n=n, v=v, dtype=torch.float32).requires_grad_(True)
        teacher = make_logits(1, n=n, v=v, dtype=torch.float32)
        target = teacher if dense else sparse_from_dense(teacher, K)
        inputs = {z.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
        saved = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in inputs:  # views of the caller's tensors cost nothing
                saved.append(t.numel())
            return t

        spec = ObjectiveSpec(name=name, tail=tail, chunk_size=chunk, ce_weight=0.1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mask = torch.arange(n) % 3 > 0 if partial_mask else all_rows(n)
            out = compute_objective(z, target, torch.zeros(n, dtype=torch.long), mask, spec, taid_t=0.5)
        out["loss_sum"].backward()
        assert torch.isfinite(z.grad).all()
        return saved

    for name, tail, dense in [("ce", "bucket", False), ("kl", "bucket", False), ("kl", "renorm", False),
                              ("kl", "uniform", False), ("kl", "bucket", True), ("taid", "bucket", False),
                              ("rlkd+kl", "bucket", False), ("rlkd", "bucket", False)]:
        for partial_mask in (False, True):
            small = saved_numels(name, tail, dense, 500, partial_mask)
            large = saved_numels(name, tail, dense, 1500, partial_mask)
            assert sum(small) == sum(large), (name, tail, dense, partial_mask)  # nothing vocab-sized survives
    z = make_logits(0, n=n, v=500, dtype=torch.float32).requires_grad_(True)
    labels, sparse = torch.zeros(n, dtype=torch.long), sparse_from_dense(make_logits(1, n=n, v=500), K)
    # the same objective without chunking does keep (N, V) intermediates: the check above can fail
    from kdcache.stages.losses import _objective_sums
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        _objective_sums(z, sparse, labels, all_rows(n), spec=ObjectiveSpec(tail="uniform"), taid_t=None)
    assert max(saved) >= n * 500


# ------------------------------------------------------------------------------------------- compute_objective

def test_objective_ce_and_kl_values():
    z, teacher = make_logits(0).requires_grad_(True), make_logits(1)
    target = sparse_from_dense(teacher, K)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    mask = all_rows()
    ce_out = compute_objective(z, target, labels, mask, ObjectiveSpec(name="ce"))
    torch.testing.assert_close(ce_out["loss_sum"], F.cross_entropy(z, labels, reduction="sum"))
    assert "kd_sum" not in ce_out and int(ce_out["n_tokens"]) == N

    kl_out = compute_objective(z, target, labels, mask, ObjectiveSpec(name="kl", tail="renorm"))
    torch.testing.assert_close(kl_out["loss_sum"], kl(z, target, mask, tail="renorm")[0])
    torch.testing.assert_close(kl_out["kd_sum"], kl_out["loss_sum"].detach())
    torch.testing.assert_close(kl_out["ce_sum"], ce_out["loss_sum"].detach())

    mixed = compute_objective(z, target, labels, mask, ObjectiveSpec(name="kl", ce_weight=0.3, temperature=2.0))
    expected = 0.7 * kl(z, target, mask, temperature=2.0)[0] + 0.3 * F.cross_entropy(z, labels, reduction="sum")
    torch.testing.assert_close(mixed["loss_sum"], expected)
    assert mixed["loss_sum"].requires_grad and not mixed["kd_sum"].requires_grad


def test_objective_ce_works_without_target_and_under_no_grad():
    z = make_logits(0, dtype=torch.float32).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    out = compute_objective(z, None, labels, all_rows(), ObjectiveSpec(name="ce", chunk_size=2))
    assert "top1_agree" not in out
    with torch.no_grad():
        out2 = compute_objective(z, None, labels, all_rows(), ObjectiveSpec(name="ce", chunk_size=2))
    assert not out2["loss_sum"].requires_grad
    torch.testing.assert_close(out["loss_sum"].detach(), out2["loss_sum"])


def test_objective_accepts_bf16_logits():
    z = make_logits(0, dtype=torch.float32).to(torch.bfloat16).requires_grad_(True)
    target = sparse_from_dense(make_logits(1, dtype=torch.float32), K)
    out = compute_objective(z, target, torch.zeros(N, dtype=torch.long), all_rows(), ObjectiveSpec())
    assert out["loss_sum"].dtype == torch.float32 and torch.isfinite(out["loss_sum"])
    out["loss_sum"].backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()


def test_agreement_metrics_count_masked_positions_only():
    teacher = torch.arange(V, dtype=torch.float64).expand(4, V).clone()       # top ids: V-1, V-2, ...
    target = sparse_from_dense(teacher, K)
    z = teacher.clone()
    z[1, V - 3], z[1, V - 4] = float(V - 4), float(V - 3)                     # row 1: top-1 right, top-5 order wrong
    z[2, 0] = 1e3                                                              # row 2: both wrong
    mask = torch.tensor([True, True, True, False])                             # row 3 would agree but is masked
    out = compute_objective(z, target, torch.zeros(4, dtype=torch.long), mask, ObjectiveSpec())
    assert int(out["top1_agree"]) == 2 and int(out["top5_order_agree"]) == 1
    dense_out = compute_objective(z, teacher, torch.zeros(4, dtype=torch.long), mask, ObjectiveSpec())
    assert int(dense_out["top1_agree"]) == 2 and int(dense_out["top5_order_agree"]) == 1


# -------------------------------------------------------------------------------------------------- the spec

def test_spec_validation_messages():
    with pytest.raises(ValueError, match="valid: ce, kl") as info:
        ObjectiveSpec(name="kll")
    assert "\n" not in str(info.value) and "rlkd+kl" in str(info.value)
    with pytest.raises(ValueError, match="tail"):
        ObjectiveSpec(tail="drop")
    for bad in [dict(temperature=0.0), dict(ce_weight=1.5), dict(jsd_beta=1.0), dict(skew_alpha=-0.1),
                dict(rlkd_k=0), dict(chunk_size=0)]:
        with pytest.raises(ValueError):
            ObjectiveSpec(**bad)
    for name in ("ce", "kl", "rkl", "jsd", "tvd", "skl", "srkl", "taid", "rlkd", "rlkd+kl"):
        assert name in LOSS_NAMES
        ObjectiveSpec(name=name)


def test_taid_objective_requires_t():
    z, target = make_logits(0), sparse_from_dense(make_logits(1), K)
    with pytest.raises(ValueError, match="taid_t"):
        compute_objective(z, target, torch.zeros(N, dtype=torch.long), all_rows(), ObjectiveSpec(name="taid"))
