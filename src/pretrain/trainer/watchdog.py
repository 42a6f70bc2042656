"""A rank that stops making progress ends itself, saying where it was (issue 29 item 2).

A hung collective (a peer SIGSTOPped, a dead NIC, a deadlock) leaves every process "Running"
while the cluster burns; NCCL's and gloo's own timeouts are long, and some hangs never reach
them. The watchdog is a thread that the loop feeds (`beat`) after every step, evaluation batch
and checkpoint phase. When no beat came for the limit, it writes every thread's Python stack
(faulthandler) to the log and the termination message and ends the process with
`contract.STALLED_EXIT`; torchrun then ends the others, and the operator restarts the gang from
the last checkpoint (reason Stalled, under the failure policy).

The limit is `runPolicy.stallTimeoutSeconds` when set; else it is derived from the steps seen,
generously: 20x the longest step, at least 15 minutes, and 1 hour until two steps are done (the
first one compiles). The process's metrics export the last beat and the limit, so the operator
can tell a rank whose whole interpreter is stuck (the watchdog thread too) from a slow one.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable

from pretrain.contract import STALLED_EXIT, stalled_message

log = logging.getLogger("pretrain.trainer")

#: The derived limit, at least.
MIN_STALL_SECONDS = 900.0
#: The derived limit before two steps are done (the first compiles, the data may be warming).
STARTUP_STALL_SECONDS = 3600.0
#: The derived limit, in longest steps seen.
STEPS_OF_SLACK = 20.0


def stall_limit(explicit: float | None, steps_done: int, longest_step: float) -> float:
    """Seconds without a beat that mean a stall (see the module docstring)."""
    if explicit is not None:
        return explicit
    if steps_done < 2:
        return STARTUP_STALL_SECONDS
    return max(MIN_STALL_SECONDS, STEPS_OF_SLACK * longest_step)


def thread_stacks() -> str:
    """Every thread's Python stack, as faulthandler writes it (it needs a real file)."""
    with tempfile.TemporaryFile(mode="w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        return f.read()


class Watchdog:
    """Calls `fire(reason, stacks)` once, from its own thread, when no beat came for the limit."""

    def __init__(self, explicit: float | None, rank: int, *, fire: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, poll: float = 1.0) -> None:  # fmt: skip
        self.explicit, self.rank, self.clock, self.poll = explicit, rank, clock, poll
        self.fire = fire or end_stalled
        self.last = clock()
        self.steps = 0
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def limit(self) -> float:
        return stall_limit(self.explicit, self.steps, self.longest)

    def beat(self, step_seconds: float | None = None) -> None:
        """Progress: a step of `step_seconds` finished, or (None) some other unit of work did."""
        if step_seconds is not None:
            self.steps += 1
            self.longest = max(self.longest, step_seconds)
        self.last = self.clock()

    def start(self) -> Watchdog:
        self.last = self.clock()
        self._thread = threading.Thread(target=self._watch, name="pretrain-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check(self) -> bool:
        """Fire if the limit passed; True when it did."""
        idle = self.clock() - self.last
        if idle < self.limit:
            return False
        reason = f"no progress on rank {self.rank} for {idle:.0f}s (limit {self.limit:.0f}s, after step {self.steps})"
        self.fire(reason, thread_stacks())
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            if self.check():
                return


def end_stalled(reason: str, stacks: str) -> None:
    """Log the stall and the stacks, leave them as the termination message, and exit at once
    (the main thread is stuck: nothing it holds can be trusted to unwind)."""
    from pretrain.termination import write_stalled

    message = stalled_message(reason, stacks)
    log.error("%s\n%s", message.splitlines()[0], stacks)
    write_stalled(message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(STALLED_EXIT)
