"""The task registry: every objective is one module of pretrain.tasks, found by its file name;
the spec, the CRD and `pretrain eval` take their lists from it, and a new module is a new task."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pretrain import objectives, tasks
from pretrain.api.crd import crd
from pretrain.api.spec import ObjectiveSpec


def test_every_module_is_a_task_named_by_its_file() -> None:
    assert objectives.names() == ("clm", "extractive-qa", "mlm", "sequence-classification", "token-classification")
    for name in objectives.names():
        task = tasks.get(name)
        assert task.name == name and task.model_class.startswith("AutoModelFor")
        assert task.fine_tuning == (name not in objectives.LANGUAGE_MODELLING) == isinstance(task, tasks.FineTuningTask)
        assert ObjectiveSpec(type=name).fine_tuning == task.fine_tuning
    with pytest.raises(ValueError, match="unknown objective 'seq2seq': one of clm, extractive-qa"):
        tasks.get("seq2seq")


def test_the_spec_and_the_crd_list_the_registry() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    objective = schema["properties"]["spec"]["properties"]["objective"]["properties"]["type"]
    assert sorted(objective["enum"]) == sorted(objectives.names())
    assert ObjectiveSpec(type="extractive-qa").fine_tuning and not ObjectiveSpec(type="clm").fine_tuning


def test_a_new_module_is_a_new_objective(tmp_path: Path) -> None:
    """What a contributor adds: one file. The spec accepts its name and the trainer's code
    finds its model class, with nothing else changed."""
    package = tmp_path / "src" / "pretrain"  # a checkout of the package, plus the contributor's file
    shutil.copytree(Path(tasks.__file__).parents[1], package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "tasks" / "summary_rating.py").write_text(textwrap.dedent('''
        from pretrain.tasks.sequence_classification import SequenceClassification

        class SummaryRating(SequenceClassification):
            """A rating of a summary: classified as a sequence, with its own name."""

            name = "summary-rating"

        TASK = SummaryRating()
    '''))  # fmt: skip
    code = textwrap.dedent("""
        import pretrain
        from pretrain.api.spec import ObjectiveSpec
        from pretrain.trainer.model import auto_class
        spec = ObjectiveSpec(type="summary-rating")
        import pretrain.tasks
        print(pretrain.__file__)
        print(spec.fine_tuning, auto_class("summary-rating").__name__,
              pretrain.tasks.get_fine_tuning("summary-rating").score.__qualname__)
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, *printed = proc.stdout.split()
    assert where == str(package / "__init__.py")
    assert printed == ["True", "AutoModelForSequenceClassification", "SequenceClassification.score"]


def test_the_api_knows_a_fine_tuning_objective_without_importing_its_task() -> None:
    """Issue 30 item 2: `ObjectiveSpec.fine_tuning` imported the task's module (and numpy, and
    through data.labeled the API again): the operator, whose image has no numpy, validates a
    fine-tuning job with data.prepare through it."""
    code = textwrap.dedent("""
        import sys
        from pretrain.api.validation import load_job
        job = load_job(sys.argv[1], [])
        assert job.spec.objective.fine_tuning
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("numpy", "torch") or m.startswith("pretrain.tasks."))
        assert not loaded, loaded
    """)
    example = Path(tasks.__file__).parents[3] / "examples" / "finetune-plays.yaml"
    proc = subprocess.run([sys.executable, "-c", code, str(example)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
