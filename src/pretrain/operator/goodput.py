"""Where a job's wall time went (issue 29 item 5), as a pure bookkeeping of its status.

`status.goodput` holds closed totals, so a reconcile that changes nothing writes nothing:

- `phaseSeconds`: time by phase, credited when the job leaves a phase (`phaseSince` is when it
  entered the current one);
- `trainerSeconds`: what each finished attempt's trainer measured while its pods ran (scraped
  into `status.progress.time`, or the final figures of rank 0's termination message): `restart`
  (process start to its first step, and reloading a checkpoint on a rollback), `training`,
  `recomputed` (steps trained again: after a rollback, and the steps an attempt trained past its
  last checkpoint before it failed, which the next attempt redoes), `checkpoint` (the training
  thread's time in saves) and `evaluation`;
- `seconds`: the breakdown: queued (Pending), preparing, restarting (backoff, pods going),
  suspended, the trainer's parts, and `other`: running time the trainer did not account for
  (an attempt's last minute before a failure, when no scrape came after it). The parts add up to
  the closed wall time by construction; `ratio` is training over it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pretrain.timestamps import micro_time, parse_time

#: The phases outside a running attempt, by the part of the breakdown they are.
PHASE_PARTS = {"Pending": "queued", "Preparing": "preparing", "Restarting": "restarting", "Suspended": "suspended"}
#: What a trainer measures of its own time.
TRAINER_PARTS = ("restart", "training", "recomputed", "checkpoint", "evaluation")


def enter_phase(goodput: dict[str, Any], old: str | None, now: datetime) -> None:
    """The job leaves phase `old` now: credit it with the time since it entered."""
    since = parse_time(goodput.get("phaseSince"))
    if old and since is not None:
        seconds = goodput.setdefault("phaseSeconds", {})
        seconds[old] = round(float(seconds.get(old, 0.0)) + max(0.0, (now - since).total_seconds()), 3)
    goodput["phaseSince"] = micro_time(now)
    goodput["seconds"] = breakdown(goodput)


def end_attempt(goodput: dict[str, Any], attempt: int, status: dict[str, Any], final: dict[str, Any] | None) -> None:
    """Add attempt `attempt`'s trainer time, once: `final` (rank 0's last figures) when it
    finished, else the last scrape of it, with the steps past its last checkpoint moved from
    training to recomputed (the next attempt trains them again)."""
    if int(goodput.get("attemptsEnded") or 0) >= attempt:
        return
    goodput["attemptsEnded"] = attempt
    scraped = (status.get("progress") or {}).get("time") or {}
    if final is None and scraped.get("attempt") != attempt:
        goodput["seconds"] = breakdown(goodput)
        return  # nothing of it was scraped: its running time stays "other"
    times = final if final is not None else scraped
    totals = goodput.setdefault("trainerSeconds", {})
    for part in TRAINER_PARTS:
        totals[part] = round(float(totals.get(part, 0.0)) + float(times.get(part) or 0.0), 3)
    if final is None:
        step = int((status.get("progress") or {}).get("step") or 0)
        saved = int((status.get("lastCheckpoint") or {}).get("step") or 0)
        lost = min(float(times.get("training") or 0.0), max(0, step - saved) * float(times.get("stepSeconds") or 0.0))
        totals["training"] = round(totals["training"] - lost, 3)
        totals["recomputed"] = round(totals["recomputed"] + lost, 3)
    goodput["seconds"] = breakdown(goodput)


def breakdown(goodput: dict[str, Any]) -> dict[str, float]:
    """The closed wall time by part (see the module docstring), with `total` and `ratio`."""
    phases = goodput.get("phaseSeconds") or {}
    trainer = goodput.get("trainerSeconds") or {}
    out = {part: float(phases.get(phase) or 0.0) for phase, part in PHASE_PARTS.items()}
    out |= {part: float(trainer.get(part) or 0.0) for part in TRAINER_PARTS}
    running = float(phases.get("Running") or 0.0)
    out["other"] = max(0.0, running - sum(out[p] for p in TRAINER_PARTS))
    total = sum(out.values())
    out = {k: round(v, 1) for k, v in out.items()}
    out["total"] = round(total, 1)
    out["ratio"] = round(out["training"] / total, 4) if total > 0 else 0.0
    return out
