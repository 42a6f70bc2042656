"""The container's termination message: the trainer's last word to Kubernetes and the operator.

A failed trainer leaves its one-line reason there: `kubectl describe pod` shows it, the operator
copies it into the job's condition, and `pretrain run` prints it as its last line (it points
PRETRAIN_TERMINATION_LOG at a file of the run folder). A finished trainer (rank 0) leaves a
one-line JSON summary there instead, `{"pretrainDone": {...}}` (DONE_KEY), from which the
operator writes the job's final progress and last checkpoint: after the pods exit there is no
metrics endpoint left to scrape. The preparation's workers (`pretrain data prepare`) leave their
summary there too, so this module lies beside `contract.py`, below both the trainer and the data.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pretrain.contract import DONE_KEY, ENV_TERMINATION_LOG, parse_done, parse_prepared

TERMINATION_LOG = "/dev/termination-log"


def _path() -> str | None:
    path = os.environ.get(ENV_TERMINATION_LOG)
    if path:
        return path
    return TERMINATION_LOG if os.path.exists(TERMINATION_LOG) else None  # not in a pod: nothing under /dev


def write_reason(reason: str) -> None:
    """Leave a failure's one-line reason (the first rank's wins over later ones, and over a
    success summary, which a failure after it makes wrong)."""
    _write_failure(reason.strip().splitlines()[0][:1000] + "\n")


def write_stalled(message: str) -> None:
    """Leave a stalled worker's message (contract.stalled_message: a reason line, then stacks)."""
    _write_failure(message.strip()[:4096] + "\n")


def _write_failure(text: str) -> None:
    path = _path()
    if path is None:
        return
    try:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path) as f:
                old = f.read(4096)
                if parse_done(old) is None and parse_prepared(old) is None:  # a failure, not a summary
                    return
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        pass  # not in a pod and not under `pretrain run`: the log line is all there is


def write_done(summary: dict[str, Any], key: str = DONE_KEY) -> None:
    """Leave the finished run's summary (rank 0, as its last act; or a preparation worker's,
    under contract.PREPARED_KEY)."""
    path = _path()
    if path is None:
        return
    try:
        line = json.dumps({key: summary}, allow_nan=False, separators=(",", ":")) + "\n"
        with open(path, "w") as f:
            f.write(line)
    except (OSError, ValueError):
        pass  # a summary that is not JSON (NaN) is not written: the operator keeps the scraped values


__all__ = ["DONE_KEY", "TERMINATION_LOG", "parse_done", "write_done", "write_reason", "write_stalled"]
