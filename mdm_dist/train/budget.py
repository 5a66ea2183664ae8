"""Fit a training run into a wall-clock budget (``train.time_budget_s``).

A run with a budget times its first steps, then fixes its step count once: the configured
``train.max_steps``, or fewer if those do not fit in the time left. The learning-rate schedule then
decays over the fixed count, so a run cut short by the budget still ends its schedule (a run that
is merely stopped at a deadline would end at a high learning rate). The decision is taken
``decide_at`` steps after the (re)start, during the warmup of the demo's configs, where the schedule
does not depend on ``max_steps`` yet: until a re-plan (below) the run follows exactly the schedule of
a run configured with the chosen count from the start.

- The first decision times the first steps only, and keeps a margin for that (``margin``). So the
  run re-plans later, when it has spent given fractions of its budget (``replan_at``, default 50%
  and 80%): from the median step time since the last decision, the count is set again to fill the
  time left less a smaller margin (``replan_margin``). The schedule's cosine then continues from
  where it is (an anchor, mdm_dist/train/schedule.py) to its end at the new count, so the learning
  rate stays continuous and the cosine still ends at ``min_lr`` at the new count. The demo's first
  plan, from steps 3-20, left about 9% of its budget unused; the re-plans take most of it back.
- Distributed runs agree: the measured step time and elapsed time are reduced (max) over ranks
  before each decision, so every rank chooses the same count; re-plans are considered only every
  ``check_every`` steps, where every rank reduces together.
- Resume is exact: the chosen count, the plans so far (each with its schedule anchor) and the time
  spent are saved in checkpoints (:meth:`StepBudget.state_dict`); a resumed run keeps them, does not
  take the first decision again, and takes the re-plans that are still due, against its own budget.
- A guard stops the run at the budget if it still runs over (a machine slowed by other jobs after
  the decision); the trainer then saves and exports as at a normal end.

The budget counts the training loop only (from its first step, saves and sample grids included),
not start-up: a caller with a total deadline (launch/demo.py) subtracts what precedes and follows.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence

from mdm_dist.train.schedule import cosine_progress

# reduce(values) -> the element-wise maximum of ``values`` over all ranks (identity on one process)
Reduce = Callable[[Sequence[float]], Sequence[float]]


def max_over_ranks(values: Sequence[float]) -> list[float]:
    """The element-wise maximum of ``values`` over the default process group (a collective);
    ``values`` unchanged without one or with one rank. :class:`StepBudget`'s default ``reduce``."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    buf = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.tolist()


class StepBudget:
    """The step count of a run under a time budget.

    ``budget_s <= 0`` means no budget: :attr:`max_steps` stays the configured count and the run is
    never stopped early. Call :meth:`start` before the first step, :meth:`after_step` after each,
    and loop while ``step < budget.max_steps`` and not :meth:`spent`.
    """

    def __init__(self, budget_s: float, max_steps: int, decide_at: int = 20, skip: int = 2,
                 margin: float = 0.05, check_every: int = 10, reduce: Reduce | None = None,
                 warmup_steps: int = 0, replan_at: Sequence[float] = (0.5, 0.8),
                 replan_margin: float = 0.02) -> None:
        if not math.isfinite(budget_s):
            raise ValueError(f"time budget must be a finite number of seconds (0 = none), got {budget_s}")
        if decide_at <= skip:
            raise ValueError(f"decide_at ({decide_at}) must exceed skip ({skip}): no step would be timed")
        if any(not 0.0 < f < 1.0 for f in replan_at) or list(replan_at) != sorted(replan_at):
            raise ValueError(f"replan_at must be increasing fractions of the budget in (0, 1), got {list(replan_at)}")
        self.budget_s = float(budget_s)
        self.configured_steps = int(max_steps)
        self.decide_at, self.skip, self.margin, self.check_every = decide_at, skip, margin, check_every
        self.reduce = reduce or max_over_ranks
        self.warmup_steps = int(warmup_steps)
        self.replan_at, self.replan_margin = tuple(float(f) for f in replan_at), float(replan_margin)
        self.planned: int | None = None  # the chosen step count, once decided
        self.replans_done = 0  # how many of ``replan_at`` are behind the run
        self.plans: list[dict] = []  # every decision: {"step", "max_steps", "anchor", "step_time_s"}
        self.elapsed_before = 0.0  # loop time of earlier processes of this run (from a checkpoint)
        self.step_time_s: float | None = None  # the step time the last decision used
        self._t0: float | None = None
        self._times: list[float] = []  # this process's step times since its start or last decision
        self._seen = 0  # steps this process ran (the first ``skip`` after a start are not timed)

    @property
    def enabled(self) -> bool:
        return self.budget_s > 0

    @property
    def max_steps(self) -> int:
        return self.planned if self.planned is not None else self.configured_steps

    @property
    def anchor(self) -> tuple[int, float] | None:
        """The schedule's (step, progress) of the last plan that moved it (None: the plain cosine)."""
        a = self.plans[-1]["anchor"] if self.plans else None
        return None if a is None else (int(a[0]), float(a[1]))

    def start(self, now: float) -> None:
        self._t0 = now

    def elapsed(self, now: float) -> float:
        if self._t0 is None:
            raise RuntimeError("StepBudget.start() was not called before the first step")
        return self.elapsed_before + (now - self._t0)

    def after_step(self, step: int, seconds: float, now: float) -> str | None:
        """Record step ``step`` (1-based, counted over the whole run), which took ``seconds``.
        Returns a message when this call fixed or changed the step count, else None. Collective (a
        reduce) on the deciding step of a budgeted run, and then every ``check_every`` steps while
        a re-plan is still due."""
        if not self.enabled:
            return None
        self._seen += 1
        if self._seen > self.skip:
            self._times.append(float(seconds))
        if self.planned is not None:
            return self._maybe_replan(step, now)
        if self._seen < self.decide_at or step >= self.configured_steps:
            return None
        step_time, elapsed = self.reduce([statistics.median(self._times), self.elapsed(now)])
        left = self.budget_s - elapsed
        fit = max(0, math.floor(left * (1.0 - self.margin) / step_time))
        self.planned = min(self.configured_steps, step + fit)
        self.step_time_s = step_time
        self.plans.append({"step": step, "max_steps": self.planned, "anchor": None, "step_time_s": step_time})
        window, self._times = len(self._times), []
        if self.planned < self.configured_steps:
            return (f"time budget {self.budget_s:.0f} s: {step_time:.3f} s per step (median of steps "
                    f"{step - window + 1}-{step}), {elapsed:.0f} s spent: "
                    f"{self.planned} of the configured {self.configured_steps} steps fit; the "
                    f"learning-rate schedule ends at step {self.planned}")
        return (f"time budget {self.budget_s:.0f} s: {step_time:.3f} s per step, {elapsed:.0f} s spent: "
                f"all {self.configured_steps} configured steps fit")

    def _maybe_replan(self, step: int, now: float) -> str | None:
        """A re-plan at a multiple of ``check_every`` once the next fraction of ``replan_at`` of the
        budget is spent (collective there: every rank reduces at the same steps)."""
        if (self.replans_done >= len(self.replan_at) or step % self.check_every or step >= self.max_steps
                or step < self.warmup_steps or len(self._times) < self.decide_at - self.skip):
            return None
        step_time, elapsed = self.reduce([statistics.median(self._times), self.elapsed(now)])
        due = sum(elapsed >= f * self.budget_s for f in self.replan_at)
        if due <= self.replans_done:
            return None
        self.replans_done = due  # one re-plan covers every fraction passed since the last
        old = self.planned
        left = self.budget_s - elapsed
        new = min(self.configured_steps, step + max(0, math.floor(left * (1.0 - self.replan_margin) / step_time)))
        self.step_time_s = step_time
        window = len(self._times)
        self._times = []
        if new == old:
            return None
        # the cosine's progress now, under the plan so far, is where the new plan continues from
        anchor = (step, cosine_progress(step, self.warmup_steps, old, self.anchor)) if new > step else self.anchor
        self.planned = max(new, step)  # at most this step: the run ends now
        self.plans.append({"step": step, "max_steps": self.planned, "anchor": anchor, "step_time_s": step_time})
        return (f"time budget {self.budget_s:.0f} s: re-planned at step {step}, {elapsed:.0f} s spent, "
                f"{step_time:.3f} s per step (median of the last {window}): {self.planned} steps instead of "
                f"{old}; the learning-rate schedule now ends at step {self.planned}")

    def spent(self, step: int, now: float) -> bool:
        """True when the budget is used up (checked every ``check_every`` steps; collective then,
        so every rank stops at the same step). The step count no longer matters then."""
        if not self.enabled or step % self.check_every or step >= self.max_steps:
            return False
        (elapsed,) = self.reduce([self.elapsed(now)])
        return elapsed > self.budget_s

    def state_dict(self, now: float) -> dict:
        return {"budget_s": self.budget_s, "configured_steps": self.configured_steps, "planned": self.planned,
                "elapsed_s": self.elapsed(now) if self._t0 is not None else self.elapsed_before,
                "step_time_s": self.step_time_s, "replans_done": self.replans_done,
                "plans": [dict(p) for p in self.plans]}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run: keep its chosen step count, its plans (and with them the schedule's
        anchor), the re-plans behind it and the time it already spent."""
        self.planned = state.get("planned")
        if self.planned is not None:
            self.planned = min(int(self.planned), self.configured_steps)
        self.elapsed_before = float(state.get("elapsed_s") or 0.0)
        self.step_time_s = state.get("step_time_s")
        self.replans_done = int(state.get("replans_done") or 0)
        self.plans = [dict(p) for p in state.get("plans") or []]
