"""mdm_dist.train.budget.StepBudget: the step count of a run under a time budget, on a fake clock
(hand-computed cases), the later re-plans and the schedule's continuity through them, rank
agreement, the guard and the checkpoint round trip."""

from __future__ import annotations

import pytest

from mdm_dist.train.budget import StepBudget
from mdm_dist.train.schedule import lr_at

FIRST_ONLY = {"replan_at": ()}  # the first decision alone


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
    b = StepBudget(100.0, 1000, decide_at=5, skip=2, margin=0.05, **FIRST_ONLY)
    msgs, steps = run(b, [10.0, 5.0, 1.0, 1.0, 1.0] + [1.0] * 200)
    assert b.planned == 5 + 77 and steps == 82 and b.step_time_s == 1.0
    assert len(msgs) == 1 and "82 of the configured 1000 steps fit" in msgs[0]
    # the loop ends inside the budget: 18 + 77 = 95 s
    assert b.elapsed(100.0 + 95.0) == pytest.approx(95.0)


def test_median_ignores_an_outlier_step():
    b = StepBudget(100.0, 1000, decide_at=6, skip=1, margin=0.0, **FIRST_ONLY)
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
        b = StepBudget(100.0, 1000, decide_at=5, skip=2, margin=0.0, reduce=make_reduce(rank), **FIRST_ONLY)
        run(b, local[rank] + [1.0] * 200)
        plans.append(b.planned)
    # max median 2 s, max elapsed 10 s: floor(90 / 2) = 45 more steps
    assert plans == [50, 50]


def test_guard_stops_a_run_that_slows_down_after_the_decision():
    b = StepBudget(40.0, 1000, decide_at=5, skip=2, margin=0.0, check_every=10, **FIRST_ONLY)
    # 1 s steps until the decision (5 s spent: 35 more steps planned), then 3 s steps
    msgs, steps = run(b, [1.0] * 5 + [3.0] * 100)
    assert b.planned == 40
    # elapsed after step k > 5: 5 + 3 (k - 5); first multiple of 10 past 40 s: step 20 (50 s)
    assert steps == 20 and b.max_steps == 40  # stopped by spent(), not by the plan
    # with the default re-plans the same run shortens its plan at half the budget instead: at
    # step 10, 20 s spent, 3 s per step: floor(20 * 0.98 / 3) = 6 more steps, ending inside 40 s
    b = StepBudget(40.0, 1000, decide_at=5, skip=2, margin=0.0, check_every=10)
    msgs, steps = run(b, [1.0] * 5 + [3.0] * 100)
    assert b.planned == 16 and steps == 16 and "16 steps instead of 40" in msgs[1]
    assert b.elapsed(100.0 + 5 + 3 * 11) <= 40.0


def test_checkpoint_round_trip_keeps_the_plan_and_the_time():
    b = StepBudget(100.0, 1000, decide_at=5, skip=2, margin=0.05, **FIRST_ONLY)
    run(b, [10.0, 5.0, 1.0, 1.0, 1.0] + [1.0] * 20)  # stops at the first 25 steps: 38 s
    state = b.state_dict(now=100.0 + 38.0)
    assert state["planned"] == 82 and state["elapsed_s"] == pytest.approx(38.0)
    # a resumed process: a different budget in its config does not change the plan, and it does
    # not decide again
    r = StepBudget(5.0, 1000, decide_at=5, skip=2, **FIRST_ONLY)
    r.load_state_dict(state)
    r.start(0.0)
    assert r.max_steps == 82 and r.elapsed(2.0) == pytest.approx(40.0)
    assert r.after_step(26, 1.0, 1.0) is None and r.planned == 82
    # a resumed run configured for fewer steps than planned stops at its own count
    short = StepBudget(100.0, 60)
    short.load_state_dict(state)
    assert short.max_steps == 60


def lrs_of(b: StepBudget, steps: int, warmup: int) -> list[float]:
    """The learning rate of each of ``steps`` steps as the trainers set it: the plan in force when
    the step ran (``b.plans``: a decision after step k applies from step k + 1 on)."""
    out, plans = [], b.plans
    for s in range(steps):  # 0-based optimizer step s is the (s + 1)-th step
        p = [p for p in plans if p["step"] <= s][-1] if any(p["step"] <= s for p in plans) else None
        n = p["max_steps"] if p else b.configured_steps
        out.append(lr_at(s, 1.0, 0.1, warmup, n, None if p is None or p["anchor"] is None else tuple(p["anchor"])))
    return out


def test_replans_fill_the_budget_and_keep_the_schedule_continuous():
    # the first plan from steps 3-5 (1 s each): 18 s spent, floor(82 * 0.95) = 77 more: 82 steps.
    # Then the steps take 0.5 s. At step 70 (the first multiple of 10 past 50 s: 18 + 65 * 0.5 =
    # 50.5 s) 49.5 s are left: floor(49.5 * 0.98 / 0.5) = 97 more, 167 steps. At step 130 (80.5 s)
    # 19.5 s: floor(19.5 * 0.98 / 0.5) = 38 more, 168 steps, ending at 80.5 + 19 = 99.5 s.
    b = StepBudget(100.0, 1000, decide_at=5, skip=2, margin=0.05, warmup_steps=3)
    msgs, steps = run(b, [10.0, 5.0, 1.0, 1.0, 1.0] + [0.5] * 400)
    assert [(p["step"], p["max_steps"]) for p in b.plans] == [(5, 82), (70, 167), (130, 168)]
    assert steps == 168 and b.replans_done == 2 and len(msgs) == 3
    assert "re-planned at step 70" in msgs[1] and "167 steps instead of 82" in msgs[1]
    assert b.elapsed(100.0 + 18.0 + 163 * 0.5) == pytest.approx(99.5)
    # the anchors: the cosine's progress at the re-plan under the plan before it
    p70 = (70 - 3) / (82 - 3)
    assert b.plans[1]["anchor"] == (70, pytest.approx(p70))
    assert b.plans[2]["anchor"] == (130, pytest.approx(p70 + (1 - p70) * (130 - 70) / (167 - 70)))
    lrs = lrs_of(b, steps, warmup=3)
    assert lrs[2] == 1.0 and lrs[-1] == pytest.approx(0.1, abs=1e-4)  # warmup done; near min_lr at the end
    assert lr_at(168, 1.0, 0.1, 3, 168, b.anchor) == pytest.approx(0.1)  # the cosine ends at the plan's count
    assert all(a >= b_ for a, b_ in zip(lrs[3:], lrs[4:]))  # decays throughout
    # continuous: across a re-plan the learning rate moves no more than a step of the decay does
    for s in (70, 130):
        assert abs(lrs[s] - lrs[s - 1]) <= 2 * abs(lrs[s - 1] - lrs[s - 2]) + 1e-12


def test_no_replan_inside_the_warmup_and_none_when_the_plan_holds():
    b = StepBudget(100.0, 1000, decide_at=5, skip=2, margin=0.0, warmup_steps=60)
    run(b, [1.0] * 100)  # the first plan: 95 more steps; 50 s pass at step 50, inside the warmup
    # the 50% re-plan waits for the warmup's end (step 60, 60 s: 60 + floor(40 * 0.98) = 99 steps);
    # at 80% (step 80, 80 s) floor(20 * 0.98) = 19 more steps give the same 99: no new plan
    assert [(p["step"], p["max_steps"]) for p in b.plans] == [(5, 100), (60, 99)] and b.replans_done == 2
    c = StepBudget(100.0, 50, decide_at=5, skip=2)  # every configured step fits: nothing to re-plan
    msgs, steps = run(c, [1.0] * 100)
    assert steps == 50 and len(c.plans) == 1 and len(msgs) == 1


def test_a_resumed_run_takes_the_replans_still_due():
    b = StepBudget(100.0, 1000, decide_at=5, skip=2, margin=0.05, warmup_steps=3)
    run(b, [10.0, 5.0, 1.0, 1.0, 1.0] + [0.5] * 75)  # stopped after step 80: re-planned at 70 only
    state = b.state_dict(now=100.0 + 18.0 + 75 * 0.5)
    assert state["replans_done"] == 1 and state["planned"] == 167
    assert state["plans"][-1]["anchor"] == (70, pytest.approx((70 - 3) / 79))
    r = StepBudget(100.0, 1000, decide_at=5, skip=2, margin=0.05, warmup_steps=3)
    r.load_state_dict(state)
    assert (r.max_steps, r.anchor, r.replans_done, len(r.plans)) == (167, state["plans"][-1]["anchor"], 1, 2)
    # the resumed process times its own steps (0.5 s) and re-plans at 80% (step 130, 80.5 s): the
    # same plan as the uninterrupted run's
    now, step, msgs = 0.0, 80, []
    r.start(now)
    while step < r.max_steps:
        now += 0.5
        step += 1
        m = r.after_step(step, 0.5, now)
        msgs += [m] if m else []
    assert [(p["step"], p["max_steps"]) for p in r.plans] == [(5, 82), (70, 167), (130, 168)] and step == 168
    assert len(msgs) == 1 and "re-planned at step 130" in msgs[0]


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
    with pytest.raises(ValueError, match="replan_at"):
        StepBudget(10.0, 10, replan_at=(0.8, 0.5))
    with pytest.raises(ValueError, match="replan_at"):
        StepBudget(10.0, 10, replan_at=(1.0,))


def test_config_rejects_a_negative_budget():
    from mdm_dist.config import ConfigError, load_config

    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "tiny.yaml", overrides=["train.time_budget_s=90"])
    assert cfg.train.time_budget_s == 90.0
    with pytest.raises(ConfigError, match="time_budget_s"):
        load_config(repo / "configs" / "tiny.yaml", overrides=["train.time_budget_s=-1"])
