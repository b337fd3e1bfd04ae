"""TAID and RLKD losses (and their wiring in compute_objective)."""
from __future__ import annotations

import math

import pytest
import torch

from kdcache.stages.losses import TAIL_MODES, ObjectiveSpec, compute_objective, kl, rank_loss, taid
from kdcache.stages.losses.divergences import divergence_rows
from kdcache.stages.losses.rlkd import rank_rows, soft_rank, spearman
from tests.unit.test_losses import K, N, V, all_rows, make_logits, sparse_from_dense, value_and_grad


# ------------------------------------------------------------------------------------------------------ TAID

def ref_taid(z, teacher_logprobs_full, t):
    """-sum p_t log q with p_t = softmax((1 - t) z + t teacher), written out over the full vocab."""
    p_t = torch.softmax((1 - t) * z.detach() + t * teacher_logprobs_full, -1)
    return -(p_t * torch.log_softmax(z, -1)).sum()


def test_taid_dense_matches_reference_formula():
    z, teacher = make_logits(0), make_logits(1)
    for t in (0.0, 0.3, 1.0):
        loss, n = taid(z, teacher, all_rows(), t=t)
        torch.testing.assert_close(loss, ref_taid(z, teacher, t))
        assert int(n) == N


def test_taid_sparse_tails_match_full_vocab_teacher_definitions():
    z, teacher = make_logits(0), make_logits(1)
    target = sparse_from_dense(teacher, K)
    on_support = torch.zeros_like(z, dtype=torch.bool).scatter(-1, target.ids, True)
    r = 1 - target.logprobs.exp().sum(-1, keepdim=True)                       # (N, 1)
    logq = torch.log_softmax(z, -1)
    tail_q = torch.where(on_support, torch.zeros_like(z), logq.exp()).sum(-1, keepdim=True)
    # bucket: tail ids get log r + log q_j - log(1 - Q_S)
    bucket = (r.log() + logq - tail_q.log()).scatter(-1, target.ids, target.logprobs)
    # uniform: tail ids get log(r / (V - K))
    uniform = (r / (V - K)).log().expand(N, V).scatter(-1, target.ids, target.logprobs)
    t = 0.4
    torch.testing.assert_close(taid(z, target, all_rows(), t=t, tail="bucket")[0], ref_taid(z, bucket, t))
    torch.testing.assert_close(taid(z, target, all_rows(), t=t, tail="uniform")[0], ref_taid(z, uniform, t))
    # renorm: everything over the support only
    z_s = z.gather(-1, target.ids)
    torch.testing.assert_close(taid(z, target, all_rows(), t=t, tail="renorm")[0],
                               ref_taid(z_s, torch.log_softmax(target.logprobs, -1), t))


def test_taid_bucket_keeps_the_interpolated_tail_proportional_to_the_student():
    """p_t restricted to the tail is a multiple of q there (gradient check: the tail-gradient pattern of
    -sum p_t log q is (Sum p_t) q - p_t, which vanishes relative to q only if p_t is proportional to q)."""
    z, target = make_logits(0), sparse_from_dense(make_logits(1), K)
    _, grad = value_and_grad(lambda x: taid(x, target, all_rows(), t=0.5, tail="bucket")[0], z)
    q = torch.softmax(z, -1)
    off = torch.ones_like(z, dtype=torch.bool).scatter(-1, target.ids, False)
    ratio = torch.where(off, grad / q, torch.nan)                              # constant per row on the tail
    spread = torch.nanquantile(ratio, 1.0, dim=-1) - torch.nanquantile(ratio, 0.0, dim=-1)
    assert spread.abs().max() < 1e-10
    assert ratio.nan_to_num().abs().max() > 1e-3                                # but not trivially zero


@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("sparse", [True, False])
def test_taid_at_t_one_has_forward_kl_gradient(tail, temperature, sparse):
    z, teacher = make_logits(0), make_logits(1)
    target = sparse_from_dense(teacher, K) if sparse else teacher
    _, taid_grad = value_and_grad(lambda x: taid(x, target, all_rows(), t=1.0, tail=tail,
                                                 temperature=temperature)[0], z)
    _, kl_grad = value_and_grad(lambda x: kl(x, target, all_rows(), tail=tail, temperature=temperature)[0], z)
    torch.testing.assert_close(taid_grad, kl_grad)


def test_taid_value_at_t_one_is_the_cross_entropy_to_the_teacher():
    """The reference's value: CE(p, q) = KL(p || q) + H(p), not KL itself."""
    z, teacher = make_logits(0), make_logits(1)
    p = torch.softmax(teacher, -1)
    entropy = -(p * p.log()).sum()
    torch.testing.assert_close(taid(z, teacher, all_rows(), t=1.0)[0], kl(z, teacher, all_rows())[0] + entropy)


def test_taid_at_t_zero_has_no_gradient():
    z, target = make_logits(0), sparse_from_dense(make_logits(1), K)
    value, grad = value_and_grad(lambda x: taid(x, target, all_rows(), t=0.0)[0], z)
    assert value > 0 and grad.abs().max() < 1e-12


@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_taid_sparse_with_full_support_equals_dense(tail, temperature):
    z, teacher = make_logits(0), make_logits(1)
    target = sparse_from_dense(teacher, V, shuffle=True)
    sparse = value_and_grad(lambda x: taid(x, target, all_rows(), t=0.55, tail=tail, temperature=temperature)[0], z)
    dense = value_and_grad(lambda x: taid(x, teacher, all_rows(), t=0.55, temperature=temperature)[0], z)
    torch.testing.assert_close(sparse[0], dense[0])
    torch.testing.assert_close(sparse[1], dense[1])


def test_taid_masked_rows_and_objective_wiring():
    z, target = make_logits(0), sparse_from_dense(make_logits(1), K)
    mask = torch.tensor([True, False, True, False, True, True, True])
    value, grad = value_and_grad(lambda x: taid(x, target, mask, t=0.7)[0], z)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask])) and grad[mask].abs().sum() > 0
    torch.testing.assert_close(value, taid(z[mask], target[mask], all_rows(5), t=0.7)[0])
    out = compute_objective(z.requires_grad_(True), target, torch.zeros(N, dtype=torch.long), mask,
                            ObjectiveSpec(name="taid", chunk_size=3), taid_t=0.7)
    torch.testing.assert_close(out["kd_sum"], value)
    assert int(out["n_tokens"]) == 5


# ------------------------------------------------------------------------------------------------------ RLKD

def hard_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def spaced_teacher(n: int = 3, v: int = V) -> torch.Tensor:
    """Well-separated teacher logits (gaps >= 1) in a different random order per row."""
    g = torch.Generator().manual_seed(5)
    return torch.stack([torch.randperm(v, generator=g) for _ in range(n)]).double()


def test_rank_loss_zero_for_identical_order_and_two_for_reversed():
    teacher = spaced_teacher()
    same, _ = rank_loss(teacher * 3 + 7, teacher, all_rows(3), k=5)
    reversed_, _ = rank_loss(-teacher, teacher, all_rows(3), k=5)
    assert float(same) / 3 < 1e-3
    assert float(reversed_) / 3 == pytest.approx(2.0, abs=1e-3)


def test_soft_spearman_matches_hard_spearman_when_values_are_separated():
    g = torch.Generator().manual_seed(0)
    a = torch.randperm(10, generator=g).double()[None] * 2
    b = torch.randperm(10, generator=g).double()[None] * 2
    valid = torch.ones(1, 10, dtype=torch.bool)
    rho = spearman(soft_rank(a, valid), soft_rank(b, valid), valid)
    assert float(rho) == pytest.approx(hard_spearman(a[0], b[0]), abs=1e-3)
    assert abs(hard_spearman(a[0], b[0])) < 0.9  # a non-trivial pair


def test_soft_rank_ignores_invalid_entries_and_ties_equal():
    values = torch.tensor([[3.0, 1.0, 1.0, 100.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True, False]])
    ranks = soft_rank(values, valid)
    assert ranks[0, 1] == ranks[0, 2] and ranks[0, 3] == 0
    assert ranks[0, 0] == pytest.approx(2.5, abs=1e-3)                         # 0.5 (self) + 1 + 1


def test_rank_loss_with_ties_has_no_nan():
    z = make_logits(0)
    flat_teacher = torch.zeros(N, V, dtype=torch.float64)                     # every teacher value ties
    value, grad = value_and_grad(lambda x: rank_loss(x, flat_teacher, all_rows(), k=5)[0], z)
    assert float(value) == pytest.approx(N * 1.0)                              # no order: correlation 0
    assert torch.isfinite(grad).all()
    tied_student = torch.zeros(N, V, dtype=torch.float64)
    value, grad = value_and_grad(lambda x: rank_loss(x, make_logits(1), all_rows(), k=5)[0], tied_student)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_rank_loss_treats_teacher_ties_symmetrically():
    """Two teacher peaks tie: a student that breaks the tie one way and one that breaks it the other way get the
    same loss, above that of a student which ties them too, and far below a reversed order."""
    teacher = spaced_teacher(1)
    second, third = torch.topk(teacher[0], 3).indices[1:]
    teacher[0, third] = teacher[0, second]                                     # tie on the teacher's peaks
    target = sparse_from_dense(teacher, K)
    students = {}
    for name, bump in [("second_first", second), ("third_first", third), ("tied", None)]:
        z = teacher * 3
        if bump is not None:
            z[0, bump] += 1.0
        students[name] = value_and_grad(lambda x: rank_loss(x, target, all_rows(1), k=5)[0], z)
    assert all(torch.isfinite(g).all() for _, g in students.values())
    one_way, other_way, tied = (float(students[n][0]) for n in ("second_first", "third_first", "tied"))
    assert one_way == pytest.approx(other_way, abs=1e-9)
    assert tied < 1e-3 < one_way < 0.2
    assert float(rank_loss(-teacher, target, all_rows(1), k=5)[0]) > 1.5


def test_rank_loss_off_support_ids_get_the_tail_value():
    """Student top-k ids outside a sparse support tie at log(r / (V - K)), below every support value."""
    teacher = spaced_teacher(1)
    target = sparse_from_dense(teacher, 5)
    z = -teacher                                                               # student's top-5: off the support
    loss_sparse, _ = rank_loss(z, target, all_rows(1), k=5)
    # hard reference: teacher values on the union = 5 support log-probs + 5 tied tail values
    top_t = target.ids[0]
    top_s = torch.topk(z[0], 5).indices
    tail_value = math.log((1 - target.logprobs.exp().sum()) / (V - 5))
    assert tail_value < float(target.logprobs.min())  # so the 5 tied tail ids rank lowest
    s_vals = torch.cat([z[0, top_t], z[0, top_s]])
    # tail ties share the average rank: Pearson of [6..10, 3,3,3,3,3] (1-based) against student ranks
    t_rank = torch.tensor([10, 9, 8, 7, 6, 3, 3, 3, 3, 3], dtype=torch.float64)
    s_rank = s_vals.argsort().argsort().double()
    a, b = t_rank - t_rank.mean(), s_rank - s_rank.mean()
    expected = 1 - float((a * b).sum() / (a.norm() * b.norm()))
    assert float(loss_sparse) == pytest.approx(expected, abs=1e-3)


def test_rank_union_is_per_row():
    """A batch gives exactly the sum of its rows computed alone (a batch-wide unique would not)."""
    teacher, z = make_logits(1), make_logits(0)
    z[2] = teacher[2] * 2                                                      # a row with full top-k overlap
    target = sparse_from_dense(teacher, K)
    rows, overlap = rank_rows(z, target, k=5)
    alone = torch.cat([rank_rows(z[i:i + 1], target[i:i + 1], k=5)[0] for i in range(N)])
    torch.testing.assert_close(rows, alone)
    assert float(overlap[2]) == 1.0 and float(overlap.min()) < 1.0
    assert float(rows[2]) < 0.05 < float(rows.max())  # same order; soft ranks are not fully hard at small gaps


def test_rank_loss_masked_rows_contribute_zero():
    teacher, z = make_logits(1), make_logits(0)
    target = sparse_from_dense(teacher, K)
    mask = torch.zeros(N, dtype=torch.bool)
    value, grad = value_and_grad(lambda x: rank_loss(x, target, mask, k=5)[0], z)
    assert float(value) == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    mask[3] = True
    value, grad = value_and_grad(lambda x: rank_loss(x, target, mask, k=5)[0], z)
    assert float(value) > 0 and grad[3].abs().sum() > 0 and grad[torch.arange(N) != 3].abs().sum() == 0


def test_rank_loss_sparse_with_full_support_equals_dense():
    z, teacher = make_logits(0), make_logits(1)
    target = sparse_from_dense(teacher, V, shuffle=True)
    sparse = value_and_grad(lambda x: rank_loss(x, target, all_rows(), k=5)[0], z)
    dense = value_and_grad(lambda x: rank_loss(x, teacher, all_rows(), k=5)[0], z)
    torch.testing.assert_close(sparse[0], dense[0])
    torch.testing.assert_close(sparse[1], dense[1])
    assert sparse[1].abs().sum() > 0


@pytest.mark.parametrize("dynamic", [False, True])
def test_rlkd_objective_combines_rank_and_base(dynamic):
    z, teacher = make_logits(0), make_logits(1)
    z[0] = teacher[0]                                                          # overlap 1 on row 0
    target = sparse_from_dense(teacher, K)
    labels = torch.zeros(N, dtype=torch.long)
    spec = ObjectiveSpec(name="rlkd+kl", rlkd_k=5, rlkd_weight=2.0, rlkd_dynamic=dynamic, chunk_size=4)
    out = compute_objective(z.requires_grad_(True), target, labels, all_rows(), spec)
    rank, overlap = rank_rows(z, target, k=5)
    base = divergence_rows("kl", z, target)
    expected = 2.0 * rank.sum() + ((overlap * base).sum() if dynamic else base.sum())
    torch.testing.assert_close(out["loss_sum"], expected)
    torch.testing.assert_close(out["rank_sum"], rank.sum().detach())
    if dynamic:
        assert 0 < float(overlap.sum()) < N                                    # the weighting actually matters
    alone = compute_objective(z, target, labels, all_rows(), ObjectiveSpec(name="rlkd", rlkd_k=5))
    torch.testing.assert_close(alone["loss_sum"], 2.0 * rank.sum())


def test_rlkd_default_is_twice_the_reference_scale_with_the_same_gradient_direction():
    """The default objective is the paper's 2 L_rank + L_KD; the official code's is L_rank + L_KD / 2. Ours is
    exactly 2x the reference in value and gradient (documented in rlkd.py and the README), so the direction an
    optimiser follows is the same."""
    z, teacher = make_logits(0), make_logits(1)
    target = sparse_from_dense(teacher, K)
    labels = torch.zeros(N, dtype=torch.long)
    spec = ObjectiveSpec(name="rlkd+kl", rlkd_k=5)
    assert spec.rlkd_weight == 2.0

    def ours(x):
        return compute_objective(x, target, labels, all_rows(), spec)["loss_sum"]

    def reference(x):
        rank, _ = rank_rows(x, target, k=5)
        return rank.sum() + divergence_rows("kl", x, target).sum() / 2

    value, grad = value_and_grad(ours, z)
    ref_value, ref_grad = value_and_grad(reference, z)
    torch.testing.assert_close(value, 2 * ref_value)
    torch.testing.assert_close(grad, 2 * ref_grad)
    assert float(torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)) > 1 - 1e-6
