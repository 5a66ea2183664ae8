"""Fit a training run into a wall-clock budget (``train.time_budget_s``).

A run with a budget times its first steps, then fixes its step count once: the configured
``train.max_steps``, or fewer if those do not fit in the time left. The learning-rate schedule then
decays over the fixed count, so a run cut short by the budget still ends its schedule (a run that
is merely stopped at a deadline would end at a high learning rate). The decision is taken
``decide_at`` steps after the (re)start, during the warmup of the demo's configs, where the schedule
does not depend on ``max_steps`` yet: the run follows exactly the schedule of a run configured with
the chosen count from the start.

- Distributed runs agree: the measured step time and elapsed time are reduced (max) over ranks
  before the decision, so every rank chooses the same count.
- Resume is exact: the chosen count and the time spent are saved in checkpoints
  (:meth:`StepBudget.state_dict`); a resumed run keeps the count and does not decide again.
- A guard stops the run at the budget if it still runs over (a machine slowed by other jobs after
  the decision); the trainer then saves and exports as at a normal end.

The budget counts the training loop only (from its first step, saves and sample grids included),
not start-up: a caller with a total deadline (launch/demo.py) subtracts what precedes and follows.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence

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
                 margin: float = 0.05, check_every: int = 10, reduce: Reduce | None = None) -> None:
        if not math.isfinite(budget_s):
            raise ValueError(f"time budget must be a finite number of seconds (0 = none), got {budget_s}")
        if decide_at <= skip:
            raise ValueError(f"decide_at ({decide_at}) must exceed skip ({skip}): no step would be timed")
        self.budget_s = float(budget_s)
        self.configured_steps = int(max_steps)
        self.decide_at, self.skip, self.margin, self.check_every = decide_at, skip, margin, check_every
        self.reduce = reduce or max_over_ranks
        self.planned: int | None = None  # the chosen step count, once decided
        self.elapsed_before = 0.0  # loop time of earlier processes of this run (from a checkpoint)
        self.step_time_s: float | None = None  # the step time the decision used
        self._t0: float | None = None
        self._times: list[float] = []

    @property
    def enabled(self) -> bool:
        return self.budget_s > 0

    @property
    def max_steps(self) -> int:
        return self.planned if self.planned is not None else self.configured_steps

    def start(self, now: float) -> None:
        self._t0 = now

    def elapsed(self, now: float) -> float:
        if self._t0 is None:
            raise RuntimeError("StepBudget.start() was not called before the first step")
        return self.elapsed_before + (now - self._t0)

    def after_step(self, step: int, seconds: float, now: float) -> str | None:
        """Record step ``step`` (1-based, counted over the whole run), which took ``seconds``.
        Returns a message when this call fixed the step count, else None. Collective (a reduce)
        on the deciding step of a budgeted run."""
        if not self.enabled or self.planned is not None:
            return None
        self._times.append(float(seconds))
        if len(self._times) < self.decide_at or step >= self.configured_steps:
            return None
        step_time, elapsed = self.reduce([statistics.median(self._times[self.skip:]), self.elapsed(now)])
        left = self.budget_s - elapsed
        fit = max(0, math.floor(left * (1.0 - self.margin) / step_time))
        self.planned = min(self.configured_steps, step + fit)
        self.step_time_s = step_time
        if self.planned < self.configured_steps:
            return (f"time budget {self.budget_s:.0f} s: {step_time:.3f} s per step (median of steps "
                    f"{step - len(self._times) + self.skip + 1}-{step}), {elapsed:.0f} s spent: "
                    f"{self.planned} of the configured {self.configured_steps} steps fit; the "
                    f"learning-rate schedule ends at step {self.planned}")
        return (f"time budget {self.budget_s:.0f} s: {step_time:.3f} s per step, {elapsed:.0f} s spent: "
                f"all {self.configured_steps} configured steps fit")

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
                "step_time_s": self.step_time_s}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run: keep its chosen step count and the time it already spent."""
        self.planned = state.get("planned")
        if self.planned is not None:
            self.planned = min(int(self.planned), self.configured_steps)
        self.elapsed_before = float(state.get("elapsed_s") or 0.0)
        self.step_time_s = state.get("step_time_s")
