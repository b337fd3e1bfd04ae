"""TAID's adaptive t and the warm-up cosine learning rate."""
from __future__ import annotations

import copy
import json
import math

import pytest

from kdcache.stages.schedules import TAIDSchedule, WarmupCosineLR


def test_taid_hand_computed_sequence():
    """total 100, alpha 0.5, beta 0.9, J = 2.0, 1.0, 1.5, 1.5:
    step 1  store J=2; t = 0.4
    step 2  delta = (2 - 1)/2 = 0.5;  m = 0.1*0.5 = 0.05;   t_lin = 0.4 + 0.6*1/100 = 0.406 (1 step done before)
            t = 0.4 + 0.5*sigmoid(0.05)*0.6 = 0.4 + 0.5*0.5124973965*0.6 = 0.5537492189
    step 3  delta = (1 - 1.5)/1 = -0.5;  m = 0.9*0.05 - 0.05 = -0.005
            t = 0.5537492189 + 0.5*sigmoid(-0.005)*(1 - 0.5537492189) = 0.5537492189 + 0.1112837891 = 0.6650330081
    step 4  delta = 0;  m = 0.9*(-0.005) = -0.0045
            t = 0.6650330081 + 0.5*sigmoid(-0.0045)*0.3349669919 = 0.7485863374"""
    sched = TAIDSchedule(total_steps=100, alpha=0.5, beta=0.9)
    assert sched.t == 0.4
    expected = [0.4, 0.5537492189, 0.6650330081, 0.7485863374]
    for step, (j, t) in enumerate(zip([2.0, 1.0, 1.5, 1.5], expected), start=1):
        assert sched.update(step, j) == pytest.approx(t, abs=1e-9)
        assert sched.t == pytest.approx(t, abs=1e-9)
    assert sched.momentum == pytest.approx(-0.0045, abs=1e-12)
    assert sched.prev_objective == 1.5


def test_taid_hand_computed_sequence_with_the_default_hyper_parameters():
    """alpha 5e-4, beta 0.99, J = 2.0, 1.0, 1.0, 0.5.
    total 10000 (the adaptive term leads):
      step 1  store J; t = 0.4
      step 2  delta = 0.5; m = 0.01*0.5 = 0.005; t = 0.4 + 5e-4*sigmoid(0.005)*0.6 = 0.4001503750  (t_lin 0.40006)
      step 3  delta = 0; m = 0.00495; t = 0.4001503750 + 5e-4*sigmoid(0.00495)*0.5998496250 = 0.4003007086
      step 4  delta = 0.5; m = 0.99*0.00495 + 0.005 = 0.0099005;
              t = 0.4003007086 + 5e-4*sigmoid(0.0099005)*0.5996992914 = 0.4004513755
    total 1000: the adaptive step is at most alpha*(1 - t) = 3e-4 < the linear 6e-4 per step, so t = t_lin of
      the steps done before each update (the reference's global_step 0, 1, 2, 3):
      0.4, 0.4006, 0.4012, 0.4018 (the momentum evolves the same)."""
    for total, expected in [(10000, [0.4, 0.4001503750, 0.4003007086, 0.4004513755]),
                            (1000, [0.4, 0.4006, 0.4012, 0.4018])]:
        sched = TAIDSchedule(total_steps=total)
        got = [sched.update(step, j) for step, j in enumerate([2.0, 1.0, 1.0, 0.5], start=1)]
        assert got == pytest.approx(expected, abs=1e-10), total
        assert sched.momentum == pytest.approx(0.0099005, abs=1e-12)


def test_taid_is_monotone_bounded_and_never_below_linear():
    sched = TAIDSchedule(total_steps=50, t_start=0.2, t_end=0.9, alpha=0.2, beta=0.5)
    objectives = [5.0, 3.0, 4.0, 10.0, 1.0, 1.0, 0.5, 7.0] * 8
    previous = sched.t
    for step, j in enumerate(objectives, start=1):
        t = sched.update(step, j)
        assert t >= previous - 1e-15
        assert t <= 0.9
        if step > 1:  # the first call only stores J (t stays t_start), the rule applies from the second on
            assert t >= min(0.9, 0.2 + 0.7 * (step - 1) / 50) - 1e-12  # the floor of the steps before it
        previous = t
    assert sched.t == 0.9  # reached the cap


def test_taid_linear_floor_dominates_with_tiny_alpha():
    sched = TAIDSchedule(total_steps=10, alpha=0.0)
    for step in range(1, 11):
        sched.update(step, 1.0 / step)
    assert sched.t == pytest.approx(0.94)  # the floor of 9 steps done before the 10th: t_end comes after the last
    assert sched.update(11, 0.05) == 1.0


def test_taid_non_adaptive_is_linear():
    sched = TAIDSchedule(total_steps=4, t_start=0.4, t_end=1.0, adaptive=False)
    assert [sched.update(s, 100.0 / s) for s in range(1, 6)] == pytest.approx([0.4, 0.55, 0.7, 0.85, 1.0])


def test_taid_ignores_non_finite_objective():
    sched = TAIDSchedule(total_steps=100, alpha=0.5, beta=0.9)
    sched.update(1, 2.0)
    sched.update(2, 1.0)
    before = sched.state_dict()
    sched.update(3, float("nan"))
    sched.update(3, float("inf"))
    assert sched.state_dict() == before


def test_taid_state_dict_round_trip_continues_exactly():
    objectives = [3.0, 2.5, 2.7, 2.0, 1.9, 2.2, 1.5, 1.4, 1.45, 1.2]
    reference = TAIDSchedule(total_steps=20, alpha=0.3, beta=0.8)
    for step, j in enumerate(objectives[:5], start=1):
        reference.update(step, j)
    state = json.loads(json.dumps(reference.state_dict()))  # survives a JSON checkpoint
    resumed = TAIDSchedule(total_steps=20, alpha=0.3, beta=0.8)
    assert resumed.t != reference.t
    resumed.load_state_dict(state)
    original = copy.deepcopy(reference)
    for step, j in enumerate(objectives[5:], start=6):
        assert resumed.update(step, j) == original.update(step, j)
    assert resumed.state_dict() == original.state_dict()


def test_taid_validation():
    with pytest.raises(ValueError):
        TAIDSchedule(total_steps=0)
    with pytest.raises(ValueError):
        TAIDSchedule(total_steps=10, t_start=0.8, t_end=0.5)


def test_warmup_cosine_lr_shape():
    sched = WarmupCosineLR(peak_lr=1e-3, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = [sched.lr(s) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])              # linear warm-up, never 0
    assert lrs[4] == pytest.approx(1e-3)                                       # cosine starts at the peak
    assert lrs[9] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way
    assert lrs[14] == pytest.approx(1e-4) and lrs[19] == pytest.approx(1e-4)   # floor after total_steps
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_warmup_cosine_lr_without_warmup_and_round_trip():
    sched = WarmupCosineLR(peak_lr=2.0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0)
    assert sched.lr(0) == pytest.approx(2.0) and sched.lr(10) == pytest.approx(0.0)
    other = WarmupCosineLR(peak_lr=1.0, warmup_steps=3, total_steps=5)
    other.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert [other.lr(s) for s in range(12)] == [sched.lr(s) for s in range(12)]


def test_raising_the_horizon_of_a_finished_run_continues_at_the_minimum_lr():
    sched = WarmupCosineLR(peak_lr=1e-3, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    sched.extend(14, 30)                                       # finished at step 14, max_steps raised to 30
    assert [sched.lr(s) for s in range(14, 35)] == pytest.approx([1e-4] * 21)   # no re-warm-up, no jump


def test_raising_the_horizon_mid_run_restretches_the_cosine_from_the_lr_it_had():
    """Stopped at step 9 of 14 (0-based steps 0..8 taken), raised to 24: from step 9 on
    lr(s) = min + (lr_old(9) - min) * (1 + cos(pi * (s - 9) / (24 - 9))) / 2."""
    old = WarmupCosineLR(peak_lr=1e-3, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    sched = copy.deepcopy(old)
    sched.extend(9, 24)
    at_resume = old.lr(9)
    assert at_resume == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    for s in range(9, 30):
        expected = 1e-4 + (at_resume - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - 9) / 15)))
        assert sched.lr(s) == pytest.approx(expected, rel=1e-12), s
    assert sched.lr(9) == old.lr(9)                            # continuous at the resume step
    assert all(a >= b for a, b in zip([sched.lr(s) for s in range(9, 30)], [sched.lr(s) for s in range(10, 31)]))


def test_raising_the_horizon_during_warmup_only_moves_the_end_of_the_cosine():
    sched = WarmupCosineLR(peak_lr=1e-3, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    sched.extend(2, 24)
    assert [sched.lr(s) for s in range(25)] == [WarmupCosineLR(1e-3, 4, 24, 0.1).lr(s) for s in range(25)]


def test_an_extended_lr_schedule_round_trips_and_extends_again():
    sched = WarmupCosineLR(peak_lr=1e-3, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    sched.extend(6, 20)
    other = WarmupCosineLR(peak_lr=1e-3, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    other.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert [other.lr(s) for s in range(6, 25)] == [sched.lr(s) for s in range(6, 25)]
    before = other.lr(12)
    other.extend(12, 40)
    assert other.lr(12) == before and other.lr(40) == pytest.approx(1e-4)
    legacy = {"peak_lr": 1e-3, "warmup_steps": 2, "total_steps": 10, "min_lr_ratio": 0.1}  # saved before extend()
    other.load_state_dict(legacy)
    assert [other.lr(s) for s in range(12)] == [WarmupCosineLR(1e-3, 2, 10, 0.1).lr(s) for s in range(12)]
    with pytest.raises(ValueError):
        other.extend(4, 8)                                     # only a longer horizon


def test_taid_extension_keeps_the_linear_floor_continuous_up_to_t_end_at_the_new_total():
    sched = TAIDSchedule(total_steps=10, t_start=0.4, t_end=1.0, adaptive=False)
    for step in range(1, 6):
        sched.update(step, 1.0)
    assert sched.t == pytest.approx(0.64)                      # the floor after 4 steps done before the 5th
    sched.extend(5, 25)                                        # the floor now runs from 0.7 at step 5 to 1.0 at 25
    assert sched.linear(5) == pytest.approx(0.7) and sched.linear(15) == pytest.approx(0.85)
    # the 6th update continues the old floor exactly (0.7, 5 steps done), the 26th reaches t_end
    assert [sched.update(s, 1.0) for s in (6, 25, 26, 30)] == pytest.approx([0.7, 0.985, 1.0, 1.0])
    state = json.loads(json.dumps(sched.state_dict()))
    resumed = TAIDSchedule(total_steps=10, t_start=0.4, t_end=1.0, adaptive=False)
    resumed.load_state_dict(state)
    assert (resumed.total_steps, resumed.linear(15)) == (25, pytest.approx(0.85))
    finished = TAIDSchedule(total_steps=4, adaptive=False)
    for step in range(1, 5):
        finished.update(step, 1.0)
    finished.extend(4, 8)                                      # a finished run stays at t_end
    assert [finished.update(s, 1.0) for s in range(5, 9)] == [1.0] * 4


def _reference_taid_t(objectives: list[float], total: int, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99,
                      adaptive=True) -> list[float]:
    """SakanaAI/TAID's update_t, transcribed: called in the forward of each step with Lightning's global_step,
    the number of optimiser steps done *before* that step; the first call only stores the loss."""
    t, momentum, prev, out = t_start, 0.0, math.inf, []
    for global_step, loss in enumerate(objectives):
        if math.isinf(prev):
            prev = loss
        else:
            momentum = beta * momentum + (1 - beta) * (prev - loss) / (prev + 1e-15)
            target = t_start + (t_end - t_start) * global_step / total
            delta = alpha * (1.0 / (1.0 + math.exp(-momentum))) * (1 - t)
            t = min(t_end, max(target, t + delta)) if adaptive else target
            prev = loss
        out.append(t)
    return out


@pytest.mark.parametrize("total, alpha, adaptive", [(12, 5e-4, True), (12, 0.3, True), (12, 5e-4, False),
                                                    (200, 0.05, True)])
def test_taid_t_matches_the_reference_update_step_by_step(total, alpha, adaptive):
    """The linear floor counts the steps done before the update, as the reference does: with the steps done after
    it (the old rule) t ran (t_end - t_start) / total_steps ahead wherever the floor leads."""
    objectives = [3.0, 2.5, 2.7, 2.0, 1.9, 2.2, 1.5, 1.4, 1.45, 1.2, 1.1, 1.0]
    sched = TAIDSchedule(total_steps=total, alpha=alpha, adaptive=adaptive)
    ours = [sched.update(step, j) for step, j in enumerate(objectives, start=1)]
    assert ours == pytest.approx(_reference_taid_t(objectives, total, alpha=alpha, adaptive=adaptive), abs=1e-12)
