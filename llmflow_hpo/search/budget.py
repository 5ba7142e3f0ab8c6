"""The time budget of a search run (``budget: 30m``): when it ends, whether a new trial still fits, and
when a running trial stops.

The clock starts when ``search`` starts (tokenizing counts; imports do not) and every worker of the run
shares its end: a worker process of ``search --workers N`` is given the seconds left (``--set budget=``)
and the end itself (``ENDS_AT`` in its environment), so its own start-up is spent from the same budget. A new trial starts only while half a
typical trial (the median complete trial so far) still fits: a trial with less than that left would
stop before it learned much. A running trial stops at the evaluation after which the next one would end
past the budget (the time since its previous evaluation is the estimate), and keeps its best so far: it
is a complete trial, tagged ``records.STOPPED_BY_BUDGET``, that retrain-best reproduces like any other.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from optuna.trial import FrozenTrial

from llmflow_hpo.search.startup import typical_trial_seconds

__all__ = ["ENDS_AT", "Budget", "TrialClock"]

# The environment variable that hands a worker process its search's budget end (``time.time()``).
ENDS_AT = "LLMFLOW_HPO_BUDGET_ENDS_AT"


@dataclass
class Budget:
    """The end of a search run, on the wall clock (``time.time()``, shared by processes on one machine)."""

    seconds: float
    ends_at: float = field(default=0.0)

    def __post_init__(self) -> None:
        if not self.ends_at:
            self.ends_at = time.time() + self.seconds

    @classmethod
    def joined(cls, seconds: float) -> Budget:
        """A worker's budget: it ends when its search's does (``ENDS_AT``), else ``seconds`` from now."""
        shared = os.environ.get(ENDS_AT)
        return cls(seconds, ends_at=float(shared)) if shared else cls(seconds)

    def left(self) -> float:
        return self.ends_at - time.time()

    def fits_a_trial(self, trials: list[FrozenTrial]) -> bool:
        """Whether a new trial may start: time is left, and half a typical trial fits in it."""
        left = self.left()
        typical = typical_trial_seconds(trials)
        return left > 0 and (typical is None or left >= 0.5 * typical)

    def clock(self) -> TrialClock:
        return TrialClock(self)


@dataclass
class TrialClock:
    """One trial's view of the budget: after each evaluation, whether the next one would end past it."""

    budget: Budget
    last: float = field(default_factory=time.time)

    def spent_after(self) -> bool:
        """Called after an evaluation: True when the next evaluation would end past the budget."""
        now = time.time()
        interval, self.last = now - self.last, now
        return now + interval > self.budget.ends_at
