"""The store's choices, without storage (storage/retention.py): what retention deletes and moves
aside, and which steps a resume tries in turn."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pretrain.storage.retention import resume_order, retention_plan

C, A, D = "complete", "absent", "damaged"


def test_the_newest_complete_steps_are_kept_and_older_ones_go() -> None:
    assert retention_plan({10: C, 20: C, 30: C, 40: C}, keep_last=2, keep_every=None) == ([10, 20], [])
    assert retention_plan({10: C, 20: C, 30: C, 40: C, 50: C}, keep_last=1, keep_every=20) == ([10, 30], [])


def test_debris_goes_only_below_the_newest_complete_step_and_damaged_steps_move_aside() -> None:
    states = {5: D, 10: C, 15: A, 20: C, 25: D, 30: C, 35: A, 40: D}
    # 35 (no manifest yet) and 40 (damaged) lie past the newest complete step: a save in flight
    assert retention_plan(states, keep_last=2, keep_every=None) == ([10, 15], [5, 25])


def test_nothing_is_decided_without_a_complete_step() -> None:
    assert retention_plan({10: A, 20: D}, keep_last=1, keep_every=None) == ([], [])


@given(st.dictionaries(st.integers(0, 60), st.sampled_from([C, A, D]), max_size=20), st.integers(1, 5),
       st.none() | st.integers(1, 20))  # fmt: skip
def test_retention_never_touches_what_it_must_keep(states: dict[int, str], keep_last: int, every: int | None) -> None:
    delete, quarantine = retention_plan(states, keep_last, every)
    complete = sorted(s for s, state in states.items() if state == C)
    gone = set(delete) | set(quarantine)
    assert not set(delete) & set(quarantine) and all(states[s] == D for s in quarantine)
    assert gone.isdisjoint(complete[-keep_last:]), "the newest keep_last complete steps stay"
    assert all(s < complete[-1] for s in gone), "nothing at or past the newest complete step is touched"
    assert not (every and any(s % every == 0 and states[s] == C for s in gone)), "every keep_every-th stays"


def test_the_steps_a_resume_tries() -> None:
    assert resume_order([10, 30, 20], "auto") == [30, 20, 10]
    assert resume_order([10, 30, 20], "never") == []
    assert resume_order([10, 30, 20], 20) == [20]
    assert resume_order([10, 30, 20], 25) is None
