"""The loss guard (issue 29 item 1): what a non-finite loss or a loss spike does to a long run.

A NaN ruins the weights at the next update, and a spike can start a divergence; what a week-long
run needs is to notice within seconds and go back. The guard reads the losses `StepSync` reads
back anyway (averaged over every rank, so every rank decides alike, and no host sync is added),
and finds the first bad step among them: a non-finite loss or gradient norm, or a loss more than
`spikeZScore` standard deviations above the mean of the last `windowSteps` good steps (after
`minHistorySteps`). With action skip the same rule was applied on the device before the update
(skipstep.py) and the guard only says which steps were left out. The loop then warns, fails, or
rolls back: it reloads the newest checkpoint
and moves the loader past the data trained on since (through the bad step), as OLMo and PaLM
skip the batches around a spike; more than `maxRollbacks` within `rollbackPeriodSteps` fails the
job in one line. Pure: the loop (loop.py) does the reloading.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

from pretrain.api.spec import GuardSpec

#: A test-only fault: `<step>:<factor>` multiplies the loss of that step before its backward
#: (`nan`, or a number: a spike); `<step>+:<factor>` every step from it on. Read only when set.
FAULT_ENV = "PRETRAIN_TEST_FAULT_LOSS"


class GuardError(RuntimeError):
    """The guard ends the run; the message is its one line."""


@dataclass(frozen=True)
class Finding:
    step: int
    kind: str  # "nonfinite" or "spike"
    loss: float
    detail: str


class LossGuard:
    def __init__(self, spec: GuardSpec) -> None:
        self.spec = spec
        self.recent: deque[float] = deque(maxlen=spec.window_steps)
        self.rollbacks: list[int] = []  # steps at which the run rolled back

    def check(self, rows: list[dict[str, Any]]) -> Finding | None:
        """The first bad step among read-back rows (in step order); good losses join the window."""
        for row in rows:
            finding = self._judge(int(row["step"]), float(row["loss"]), row.get("grad_norm"))
            if finding is not None:
                return finding
            self.recent.append(float(row["loss"]))
        return None

    def skipped(self, rows: list[dict[str, Any]]) -> list[Finding]:
        """With action skip (the device decided, skipstep.py): a finding for each step left out,
        said as this guard would judge it (the same rule over the same losses), or non-finite
        gradients when the loss was good; the other losses join the window."""
        found = []
        for row in rows:
            step, loss = int(row["step"]), float(row["loss"])
            if row.get("skipped"):
                found.append(
                    self._judge(step, loss, None) or Finding(step, "nonfinite", loss, "a gradient is not finite")
                )
            else:
                self.recent.append(loss)
        return found

    def _judge(self, step: int, loss: float, grad_norm: float | None) -> Finding | None:
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            return Finding(step, "nonfinite", loss, f"loss {loss}, gradient norm {grad_norm}")
        z_limit = self.spec.spike_z_score
        if not z_limit or len(self.recent) < self.spec.min_history_steps:
            return None
        mean = sum(self.recent) / len(self.recent)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / len(self.recent))
        z = (loss - mean) / std if std > 0 else (math.inf if loss > mean else 0.0)
        if z > z_limit:
            return Finding(step, "spike", loss, f"loss {loss:.4f} is {z:.1f} standard deviations above the mean "
                           f"{mean:.4f} of the last {len(self.recent)} steps (limit {z_limit:g})")  # fmt: skip
        return None

    def allow_rollback(self, step: int) -> str | None:
        """None when one more rollback (or skipped step) at `step` is within bounds, else why not
        (and it is not counted)."""
        period = self.spec.rollback_period_steps
        recent = [s for s in self.rollbacks if s > step - period]
        if len(recent) >= self.spec.max_rollbacks:
            what = "skipped steps" if self.spec.action == "skip" else "rollbacks"
            return (f"{len(recent)} {what} within {period} steps already (training.guard.maxRollbacks "
                    f"{self.spec.max_rollbacks})")  # fmt: skip
        self.rollbacks.append(step)
        return None


@dataclass
class Fault:
    """The test-only loss fault of FAULT_ENV: once at its step (a rolled-back run passes that
    step again, with other data), or at every step from it on."""

    step: int
    factor: float
    onwards: bool
    fired: bool = False

    def factor_at(self, step: int) -> float | None:
        if (step == self.step and not self.fired) or (self.onwards and step >= self.step):
            self.fired = True
            return self.factor
        return None


def fault_from_env() -> Fault | None:
    text = os.environ.get(FAULT_ENV)
    if not text:
        return None
    where, factor = text.split(":", 1)
    onwards = where.endswith("+")
    return Fault(int(where.rstrip("+")), float(factor), onwards)
