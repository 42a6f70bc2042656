"""What to keep and what to resume from: pure choices over the states of a location's steps.

The store (`checkpoint.py`) reads the states (complete, absent, damaged: `Location.manifest_state`)
and carries the choices out; the choices themselves are here, without storage, unit-tested.
"""

from __future__ import annotations

from collections.abc import Mapping


def retention_plan(states: Mapping[int, str], keep_last: int, keep_every: int | None) -> tuple[list[int], list[int]]:
    """(delete, quarantine) among the steps whose manifest states are `states`: the newest
    `keep_last` complete steps are kept, and every `keep_every`-th; older complete steps and older
    debris go, and older damaged steps are moved aside. Nothing at or past the newest complete
    step is touched: a newer folder without a manifest may be a save in flight."""
    complete = sorted(s for s, state in states.items() if state == "complete")
    if not complete:
        return [], []
    newest = complete[-1]
    keep = set(complete[-keep_last:]) | {newest}
    if keep_every:
        keep |= {s for s in complete if s % keep_every == 0}
    old = [s for s in sorted(states) if s not in keep and s < newest]
    return [s for s in old if states[s] != "damaged"], [s for s in old if states[s] == "damaged"]


def resume_order(steps: list[int], resume: int | str) -> list[int] | None:
    """The steps to try in turn for `checkpoint.resume` (newest first for `latest`, none for
    `never`, only that step for a number), or None when the step asked for is not there."""
    if resume == "never":
        return []
    if isinstance(resume, int):
        return [resume] if resume in steps else None
    return sorted(steps, reverse=True)
