"""The objectives' names, read from `pretrain/tasks`' file names without importing that package.

The API model (`api/spec.py: ObjectiveType`, the CRD's enum) and the operator, whose image has no
numpy or torch, need the names; the task modules need numpy and the data package, which needs the
API. Reading the folder here, in a leaf module, keeps the API below the tasks: no import circle.
"""

from __future__ import annotations

import pkgutil
from functools import cache
from pathlib import Path

#: Where the task modules lie: each public module is one objective, named by its file.
TASKS_DIR = Path(__file__).parent / "tasks"

#: The objectives that train on packed text; every other task fine-tunes on labelled rows.
#: tests/test_tasks.py checks it against each module's `Task.fine_tuning`.
LANGUAGE_MODELLING = ("clm", "mlm")


@cache
def names() -> tuple[str, ...]:
    """Every objective's name (`extractive_qa.py` is `extractive-qa`), sorted."""
    found = pkgutil.iter_modules([str(TASKS_DIR)])
    return tuple(sorted(m.name.replace("_", "-") for m in found if not m.name.startswith("_")))


def is_fine_tuning(objective_type: str | None) -> bool:
    """Trained on labelled rows (a fine-tuning task) rather than packed text."""
    return objective_type is not None and objective_type not in LANGUAGE_MODELLING
