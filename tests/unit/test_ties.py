"""Agreement metrics that do not depend on how ties are stored: a tie among m ids credits 1/m (a random tie-break's
expected agreement), whatever order the cache stores the tied ids in; the committee's "best member" splits ties."""
import math

import pytest
import torch

from kdcache.stages.evaluate import best_members, tie_note, top1_right
from kdcache.stages.losses import ObjectiveSpec, SparseTarget, agreement_counts, compute_objective
from kdcache.stages.losses.committee import committee_objective

V = 12


def sparse(ids: list[list[int]], probs: list[list[float]]) -> SparseTarget:
    """A hand-made target; a probability of 0 is an unused slot (logprob -inf, as the decoder pads sampled rows)."""
    logprobs = torch.tensor(probs, dtype=torch.float64).log().float()
    return SparseTarget(ids=torch.tensor(ids), logprobs=logprobs, lognorm=torch.zeros(len(ids)))


def student_ranking(order: list[int]) -> torch.Tensor:
    """Student logits (1, V) whose ids rank as `order` (then every other id, lower)."""
    z = torch.zeros(1, V)
    for rank, i in enumerate(order):
        z[0, i] = 10.0 - rank
    return z


def counts(z, target, mask=None):
    mask = torch.ones(z.shape[0], dtype=torch.bool) if mask is None else mask
    return [float(c) for c in agreement_counts(z, target, mask)]


# a sampled cache: 4 ids drawn 10 times each out of 40, stored by id (as the codec stores equal counts)
DRAWN = sparse([[2, 5, 7, 9]], [[0.25, 0.25, 0.25, 0.25]])


@pytest.mark.parametrize("argmax", [2, 5, 7, 9])
def test_a_tied_top1_credits_one_over_m_whichever_tied_id_the_student_picks(argmax):
    top1, _, tied = counts(student_ranking([argmax]), DRAWN)
    assert top1 == pytest.approx(1 / 4) and tied == 1  # the first stored id (2) gets no more than the others


def test_a_student_argmax_outside_the_tie_gets_nothing():
    assert counts(student_ranking([3]), DRAWN)[:2] == [0.0, 0.0]


def test_the_stored_order_of_tied_ids_changes_nothing():
    shuffled = sparse([[9, 2, 7, 5]], [[0.25, 0.25, 0.25, 0.25]])
    for argmax in (2, 5, 9, 3):
        assert counts(student_ranking([argmax]), shuffled) == counts(student_ranking([argmax]), DRAWN)


def test_a_clear_top1_is_all_or_nothing_and_not_a_tie():
    target = sparse([[4, 1, 6]], [[0.5, 0.25, 0.25]])        # 1 and 6 tie, but below the top
    assert counts(student_ranking([4]), target) == [1.0, 0.0, 0.0]
    assert counts(student_ranking([1]), target) == [0.0, 0.0, 0.0]


def test_unused_slots_are_not_tied_ids():
    target = sparse([[3, 8, 3, 3]], [[0.5, 0.5, 0.0, 0.0]])  # two drawn ids, two padding slots repeating id 3
    assert counts(student_ranking([3]), target)[0] == pytest.approx(1 / 2)


# top-5 order: teacher a > b = c > d > e > f (ids 0..5), and a tie across the 5th rank
ORDERED = sparse([[0, 1, 2, 3, 4, 5]], [[0.3, 0.2, 0.2, 0.1, 0.08, 0.05]])
ACROSS = sparse([[0, 1, 2, 3, 4, 5, 6]], [[0.3, 0.2, 0.15, 0.1, 0.05, 0.05, 0.05]])


@pytest.mark.parametrize("target, order, credit", [
    (ORDERED, [0, 1, 2, 3, 4], 1 / 2),      # b, c in either order: one of the 2 tie-breaks
    (ORDERED, [0, 2, 1, 3, 4], 1 / 2),
    (ORDERED, [0, 1, 3, 2, 4], 0.0),        # d before c: no tie-break of the teacher gives that order
    (ORDERED, [0, 1, 2, 3, 5], 0.0),        # f is not the teacher's 5th
    (ACROSS, [0, 1, 2, 3, 5], 1 / 3),       # the 5th is one of 3 tied ids
    (ACROSS, [0, 1, 2, 3, 6], 1 / 3),
])
def test_top5_order_agreement_is_the_chance_of_a_random_tie_break(target, order, credit):
    assert counts(student_ranking(order), target)[1] == pytest.approx(credit)


def test_without_ties_the_metrics_are_the_plain_counts():
    target = sparse([[0, 1, 2, 3, 4, 5]], [[0.3, 0.25, 0.2, 0.1, 0.08, 0.05]])
    assert counts(student_ranking([0, 1, 2, 3, 4]), target) == [1.0, 1.0, 0.0]
    assert counts(student_ranking([0, 2, 1, 3, 4]), target) == [1.0, 0.0, 0.0]


def test_a_dense_target_counts_ties_as_its_sparse_form_does():
    probs = [0.3, 0.2, 0.2, 0.1, 0.05, 0.05, 0.05] + [0.01] * (V - 7)
    dense = torch.tensor([probs]).log()                                         # (1, V) all ids
    full = sparse([list(range(V))], [probs])
    for order in ([0, 1, 2, 3, 4], [0, 2, 1, 3, 6], [1, 0, 2, 3, 4]):
        z = student_ranking(order)
        assert counts(z, dense) == pytest.approx(counts(z, full))
    tied = torch.tensor([[0.25] * 4 + [0.0] * (V - 4)]).clamp(min=1e-9).log()  # 4 ids tie at the top
    assert counts(student_ranking([1]), tied)[0] == pytest.approx(1 / 4)


def test_masked_positions_count_nothing():
    target = SparseTarget(ids=DRAWN.ids.repeat(3, 1), logprobs=DRAWN.logprobs.repeat(3, 1), lognorm=torch.zeros(3))
    z = student_ranking([5]).repeat(3, 1)
    assert counts(z, target, torch.tensor([True, False, True])) == pytest.approx([0.5, 0.0, 2.0])


def test_objectives_report_the_tie_aware_sums_and_the_tied_positions():
    target = SparseTarget(ids=torch.cat([DRAWN.ids, ORDERED.ids[:, :4]]),
                          logprobs=torch.cat([DRAWN.logprobs, ORDERED.logprobs[:, :4]]), lognorm=torch.zeros(2))
    z = torch.cat([student_ranking([7]), student_ranking([0, 2, 1, 3])])
    labels, every = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool)
    out = compute_objective(z, target, labels, every, ObjectiveSpec(name="kl", chunk_size=1))
    # row 0: a 4-way tie at the top; row 1: a clear top-1, b = c tied in the top-4 order
    assert float(out["top1_agree"]) == pytest.approx(1.25) and float(out["top1_tied"]) == 1
    assert float(out["top5_order_agree"]) == pytest.approx(0.5)
    mixed = committee_objective(z, [target, target], torch.full((2, 2), 0.5), labels, every, ObjectiveSpec())
    assert [float(mixed[k]) for k in ("top1_agree", "top5_order_agree", "top1_tied")] == pytest.approx([1.25, 0.5, 1])


def test_best_member_shares_split_ties_evenly():
    label_logp = torch.tensor([[-1.0, -1.0, -3.0],       # members 0 and 1 tie
                               [-2.0, -1.0, -1.0],       # members 1 and 2 tie
                               [-math.inf] * 3,          # no member has the token: all tie
                               [-1.0, -2.0, -3.0]])
    best = best_members(label_logp)
    torch.testing.assert_close(best, torch.tensor([[0.5, 0.5, 0], [0, 0.5, 0.5], [1 / 3] * 3, [1.0, 0, 0]],
                                                  dtype=torch.float64))
    assert best.sum(0)[0] == pytest.approx(1.5 + 1 / 3)  # not 3, as argmax gave every tie to the first member


def test_the_first_members_top1_is_right_by_a_share_on_a_tie():
    right = top1_right(DRAWN.__getitem__(slice(0, 1)), torch.tensor([7]))
    assert float(right) == pytest.approx(1 / 4)
    assert float(top1_right(ORDERED, torch.tensor([0]))) == 1.0 and float(top1_right(ORDERED, torch.tensor([1]))) == 0


def test_the_evaluation_note_reports_the_tie_share():
    assert "a tie at 100.0% of these positions: the cache often cannot tell" in tie_note(1.0)
    assert tie_note(0.002).endswith("a tie at 0.2% of these positions.")
