"""mdm_dist.train.budget.StepBudget: the step count of a run under a time budget, on a fake clock
(hand-computed cases), rank agreement, the guard and the checkpoint round trip."""

from __future__ import annotations

import pytest

from mdm_dist.train.budget import StepBudget


def run(budget: StepBudget, step_times: list[float], start: float = 100.0) -> tuple[list[str], int]:
    """Drive ``budget`` as the trainers do, on a fake clock; returns (messages, steps run)."""
    now, step, msgs = start, 0, []
    budget.start(now)
    while step < budget.max_steps and step < len(step_times):
        now += step_times[step]
        step += 1
        m = budget.after_step(step, step_times[step - 1], now)
        if m:
            msgs.append(m)
        if budget.spent(step, now):
            break
    return msgs, step


def test_no_budget_keeps_the_configured_steps():
    b = StepBudget(0.0, 30)
    msgs, steps = run(b, [5.0] * 40)
    assert (msgs, steps, b.max_steps, b.planned) == ([], 30, 30, None)


def test_hand_computed_step_count():
    # steps 1-2 are not timed (skip 2); steps 3-5 take 1 s each: median 1 s. After step 5 the loop
    # has run 10 + 5 + 1 + 1 + 1 = 18 s; 100 - 18 = 82 s left, 95% of it = 77.9 s -> 77 more steps
    b = StepBudget(100.0, 1000, decide_at=5, skip=2, margin=0.05)
    msgs, steps = run(b, [10.0, 5.0, 1.0, 1.0, 1.0] + [1.0] * 200)
    assert b.planned == 5 + 77 and steps == 82 and b.step_time_s == 1.0
    assert len(msgs) == 1 and "82 of the configured 1000 steps fit" in msgs[0]
    # the loop ends inside the budget: 18 + 77 = 95 s
    assert b.elapsed(100.0 + 95.0) == pytest.approx(95.0)


def test_median_ignores_an_outlier_step():
    b = StepBudget(100.0, 1000, decide_at=6, skip=1, margin=0.0)
    run(b, [3.0, 1.0, 1.0, 30.0, 1.0, 1.0] + [1.0] * 100)  # median of 1, 1, 30, 1, 1 = 1
    assert b.step_time_s == 1.0 and b.planned == 6 + (100 - 37)


def test_configured_steps_that_fit_are_kept():
    b = StepBudget(1000.0, 50, decide_at=5, skip=2)
    msgs, steps = run(b, [1.0] * 60)
    assert b.planned == 50 and steps == 50 and "all 50 configured steps fit" in msgs[0]


def test_a_budget_spent_before_the_decision_stops_there():
    b = StepBudget(3.0, 50, decide_at=5, skip=2)
    _, steps = run(b, [1.0] * 60)
    assert b.planned == 5 and steps == 5


def test_runs_shorter_than_the_decision_are_untouched():
    b = StepBudget(1.0, 4, decide_at=5, skip=2)
    msgs, steps = run(b, [1.0] * 10)
    assert msgs == [] and steps == 4 and b.planned is None


def test_ranks_agree_through_the_reduce():
    # two ranks with different local step times: the reduce (max) makes both choose the slower plan
    local = {0: [1.0] * 10, 1: [2.0] * 10}

    def make_reduce(rank):
        def reduce(values):
            if len(values) == 1:  # the guard's check: no other rank is over the budget here
                return values
            o_times = local[1 - rank]  # the other rank's (median, elapsed) at the decision, step 5
            return [max(values[0], sorted(o_times[2:5])[1]), max(values[1], sum(o_times[:5]))]
        return reduce

    plans = []
    for rank in (0, 1):
        b = StepBudget(100.0, 1000, decide_at=5, skip=2, margin=0.0, reduce=make_reduce(rank))
        run(b, local[rank] + [1.0] * 200)
        plans.append(b.planned)
    # max median 2 s, max elapsed 10 s: floor(90 / 2) = 45 more steps
    assert plans == [50, 50]


def test_guard_stops_a_run_that_slows_down_after_the_decision():
    b = StepBudget(40.0, 1000, decide_at=5, skip=2, margin=0.0, check_every=10)
    # 1 s steps until the decision (5 s spent: 35 more steps planned), then 3 s steps
    msgs, steps = run(b, [1.0] * 5 + [3.0] * 100)
    assert b.planned == 40
    # elapsed after step k > 5: 5 + 3 (k - 5); first multiple of 10 past 40 s: step 20 (50 s)
    assert steps == 20 and b.max_steps == 40  # stopped by spent(), not by the plan


def test_checkpoint_round_trip_keeps_the_plan_and_the_time():
    b = StepBudget(100.0, 1000, decide_at=5, skip=2, margin=0.05)
    run(b, [10.0, 5.0, 1.0, 1.0, 1.0] + [1.0] * 20)  # stops at the first 25 steps: 38 s
    state = b.state_dict(now=100.0 + 38.0)
    assert state["planned"] == 82 and state["elapsed_s"] == pytest.approx(38.0)
    # a resumed process: a different budget in its config does not change the plan, and it does
    # not decide again
    r = StepBudget(5.0, 1000, decide_at=5, skip=2)
    r.load_state_dict(state)
    r.start(0.0)
    assert r.max_steps == 82 and r.elapsed(2.0) == pytest.approx(40.0)
    assert r.after_step(26, 1.0, 1.0) is None and r.planned == 82
    # a resumed run configured for fewer steps than planned stops at its own count
    short = StepBudget(100.0, 60)
    short.load_state_dict(state)
    assert short.max_steps == 60


def test_max_over_ranks_without_a_process_group_returns_the_values():
    from mdm_dist.train.budget import max_over_ranks

    assert max_over_ranks([1.5, 2.0]) == [1.5, 2.0]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="finite"):
        StepBudget(float("inf"), 10)
    with pytest.raises(ValueError, match="decide_at"):
        StepBudget(10.0, 10, decide_at=2, skip=2)
    with pytest.raises(RuntimeError, match="start"):
        StepBudget(10.0, 10).elapsed(1.0)


def test_config_rejects_a_negative_budget():
    from mdm_dist.config import ConfigError, load_config

    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "tiny.yaml", overrides=["train.time_budget_s=90"])
    assert cfg.train.time_budget_s == 90.0
    with pytest.raises(ConfigError, match="time_budget_s"):
        load_config(repo / "configs" / "tiny.yaml", overrides=["train.time_budget_s=-1"])
