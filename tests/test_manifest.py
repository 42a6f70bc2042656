"""The manifest contract: readers get a Manifest only when its shape is right, and a store
treats a step whose manifest is malformed as incomplete (never loaded, never trusted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pretrain.storage.checkpoint import CheckpointStore
from pretrain.storage.manifest import MANIFEST, parse_manifest, step_name, total_bytes

GOOD = {"step": 4, "world_size": 2, "zero_stage": 1, "time": "2026-01-01T00:00:00+00:00",
        "files": {"a.pt": {"size": 3, "sha256": "0" * 64}, "b/c.pt": {"size": 5, "sha256": "1" * 64}}}  # fmt: skip


def test_a_good_manifest_parses_with_its_fields() -> None:
    m = parse_manifest(GOOD)
    assert m is not None and m["step"] == 4 and m.get("world_size") == 2 and total_bytes(m) == 8


@pytest.mark.parametrize(
    "bad",
    [
        None, [], "text", {}, {"files": []}, {"files": {"a": "x"}},
        {"files": {"a": {"size": "3", "sha256": "0"}}}, {"files": {"a": {"size": -1, "sha256": "0"}}},
        {"files": {"a": {"size": True, "sha256": "0"}}}, {"files": {"a": {"size": 1}}},
        {**GOOD, "step": "4"}, {**GOOD, "world_size": 1.5}, {**GOOD, "zero_stage": None},
    ],
)  # fmt: skip
def test_anything_else_is_not_a_manifest(bad: Any) -> None:
    assert parse_manifest(bad) is None


def test_a_step_with_a_malformed_manifest_is_incomplete(tmp_path: Path) -> None:
    for step, doc in ((4, GOOD), (8, {**GOOD, "step": "eight"})):
        (tmp_path / step_name(step)).mkdir()
        (tmp_path / step_name(step) / MANIFEST).write_text(json.dumps(doc))
    store = CheckpointStore(str(tmp_path), workdir=tmp_path / "work")
    assert store.steps() == [4, 8] and store.complete_steps() == [4]
    assert step_name(8) == "step-00000008"
