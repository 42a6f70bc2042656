"""Fine-tuning: metric functions on hand-computed cases, labelled-data errors naming the row, and
each task trained from an exported pre-trained model beating a trivial baseline."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pretrain import tasks
from pretrain.api.spec import DataSourceSpec, DataSpec, ObjectiveSpec
from pretrain.corpora.tasks import speeches
from pretrain.data.sources import DataError
from pretrain.data.tokenizer import bytes_tokenizer
from pretrain.evaluation import accuracy, entities, entity_scores, exact_match, macro_f1, qa_scores, token_f1
from tests.trainer_runs import Run, run_job

# ----------------------------------------------------------------------------- metrics by hand


def test_accuracy_and_macro_f1_by_hand() -> None:
    gold, pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    assert accuracy(gold, pred) == 3 / 5
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp0 fp0 fn1 -> 0
    assert macro_f1(gold, pred, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1([0, 0], [0, 0], 5) == 1.0, "classes absent from both sides do not count"
    assert accuracy([], []) == 0.0


def test_entities_from_bio() -> None:
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert entities(["I-PER", "I-PER"]) == {("PER", 0, 2)}, "an I- without a B- opens an entity"
    assert entities(["B-PER", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 2)}
    assert entities(["B-PER", "B-PER"]) == {("PER", 0, 1), ("PER", 1, 2)}
    assert entities(["O", "O"]) == set()


def test_entity_scores_by_hand() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-PER", "O"]]  # a partial span and a spurious one
    s = entity_scores(gold, pred)
    # gold {PER 0-2, LOC 3-4}; pred {PER 0-1, LOC 3-4, PER 0-1 (sentence 2)}: tp 1
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 2)
    assert s["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert entity_scores([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}, "empty entity sets"
    assert entity_scores([["B-X"]], [["O"]])["recall"] == 0.0


def test_squad_metrics_by_hand() -> None:
    assert exact_match("The Cat!", ["a cat", "cat"]) == 1.0
    assert exact_match("cat sat", ["cat"]) == 0.0
    assert token_f1("cat sat", ["the cat"]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # p 1/2, r 1
    assert token_f1("dog", ["cat"]) == 0.0
    assert token_f1("", [""]) == 1.0
    assert qa_scores(["cat", "dog"], [["cat"], ["bird"]]) == {"exact_match": 0.5, "f1": 0.5}


# ----------------------------------------------------------------------------- data errors


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_unknown_label_names_the_row(tmp_path: Path) -> None:
    uri = _jsonl(
        tmp_path / "cls.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": "zz"}]
    )
    obj = ObjectiveSpec(type="sequence-classification", label_names=["x", "y"])
    with pytest.raises(DataError, match=r"cls\.jsonl:3: label 'zz' is not one of x, y"):
        tasks.load_labeled(
            obj,
            DataSpec(sources=[DataSourceSpec(uri=uri)], sequence_length=8, validation_split=0),
            bytes_tokenizer(),
            0,
        )


def test_qa_span_outside_context_names_the_row(tmp_path: Path) -> None:
    rows = [{"question": "q", "context": "short", "answers": {"text": ["short"], "answer_start": [0]}},
            {"question": "q", "context": "tiny", "answers": {"text": ["tiny"], "answer_start": [3]}}]  # fmt: skip
    uri = _jsonl(tmp_path / "qa.jsonl", rows)
    obj = ObjectiveSpec(type="extractive-qa")
    with pytest.raises(DataError, match=r"qa\.jsonl:2: answer 'tiny' at 3 lies outside its context"):
        tasks.load_labeled(
            obj,
            DataSpec(sources=[DataSourceSpec(uri=uri)], sequence_length=16, validation_split=0),
            bytes_tokenizer(),
            0,
        )


def test_token_and_tag_counts_must_match(tmp_path: Path) -> None:
    uri = _jsonl(tmp_path / "ner.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(DataError, match=r"ner\.jsonl:1: 2 tokens but 1 tags"):
        tasks.load_labeled(ObjectiveSpec(type="token-classification"),
                     DataSpec(sources=[DataSourceSpec(uri=uri)], sequence_length=8, validation_split=0), bytes_tokenizer(), 0)  # fmt: skip


# ----------------------------------------------------------------------------- training


def _lines() -> list[str]:
    out = []
    for _, body in speeches():
        for sentence in re.split(r"(?<=[.!?;:])\s+", body):
            if 20 <= len(sentence) <= 60:
                out.append(sentence)
    return out


def write_tasks(d: Path) -> dict[str, tuple[str, str]]:
    """Three small tasks from the corpus: is the sentence a question; which words are capitalised
    (BIO tags); which word ends the sentence (a span)."""
    lines = _lines()[:1500]
    cls = [{"text": s, "label": "question" if s.endswith("?") else "statement"} for s in lines]
    questions = [r for r in cls if r["label"] == "question"]
    statements = [r for r in cls if r["label"] == "statement"][: len(questions)]
    cls = [r for pair in zip(questions, statements, strict=False) for r in pair]
    ner = []
    for s in lines:
        words = s.split()
        ner.append({"tokens": words, "tags": ["B-CAP" if i and w[:1].isupper() else "O" for i, w in enumerate(words)]})
    qa = []
    for s in lines:
        last = re.findall(r"[A-Za-z']+", s)[-1]
        start = s.rfind(last)
        qa.append({"question": "last?", "context": s, "answers": {"text": [last], "answer_start": [start]}})
    out = {}
    for name, rows in (("cls", cls), ("ner", ner), ("qa", qa)):
        cut = len(rows) * 4 // 5
        out[name] = (_jsonl(d / f"{name}-train.jsonl", rows[:cut]), _jsonl(d / f"{name}-val.jsonl", rows[cut:]))
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[str, str]]]:
    base = tmp_path_factory.mktemp("finetune")
    run = run_job(base / "pretrain", ["tokenizer.type=bytes", "training.maxSteps=40", "training.optimizer.lr=0.003"])
    assert run.proc.returncode == 0, run.output[-3000:]
    return run.out / "checkpoints" / "final", write_tasks(base)


def finetune(tmp: Path, init: Path, objective: str, train: str, val: str, extra: list[str]) -> Run:
    run = run_job(tmp, [f"model.initFrom={init}", f"objective.type={objective}", f"data.sources.0.uri={train}",
                        f"data.validationSources=[{{uri: {val}}}]", "data.sequenceLength=64", "training.maxSteps=60",
                        "training.globalBatchSize=16", "training.microBatchSize=8", "training.optimizer.lr=0.002",
                        "training.zero.stage=1", *extra])  # fmt: skip
    assert run.proc.returncode == 0, run.output[-3000:]
    return run


def final_metrics(run: Run) -> dict[str, float]:
    data: dict[str, float] = json.loads((run.out / "checkpoints" / "final" / "metrics.json").read_text())
    return data


@pytest.mark.slow
def test_sequence_classification_beats_majority(pretrained: tuple[Path, Any], tmp_path: Path) -> None:
    init, tasks = pretrained
    run = finetune(tmp_path, init, "sequence-classification", *tasks["cls"], [])
    val = [json.loads(x)["label"] for x in Path(tasks["cls"][1]).read_text().splitlines()]
    majority = max(val.count(v) for v in set(val)) / len(val)
    m = final_metrics(run)
    assert m["examples"] == len(val)
    assert m["accuracy"] >= majority + 0.15, (m, majority)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(run.out / "checkpoints" / "final"))
    assert set(config.id2label.values()) == {"question", "statement"}, "the label mapping is stored with the model"
    # `pretrain eval` scores the exported model the same way, without training
    from click.testing import CliRunner

    from pretrain.cli import main

    result = CliRunner().invoke(main, ["eval", "--model", str(run.out / "checkpoints" / "final"), "--data", tasks["cls"][1],
                                       "--objective", "sequence-classification", "--max-length", "64"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(m["accuracy"])


@pytest.mark.slow
def test_token_classification_beats_all_outside(pretrained: tuple[Path, Any], tmp_path: Path) -> None:
    init, tasks = pretrained
    run = finetune(tmp_path, init, "token-classification", *tasks["ner"], ["training.maxSteps=200"])
    m = final_metrics(run)
    # predicting "O" everywhere finds no entity: F1 0
    assert m["f1"] >= 0.5, m


@pytest.mark.slow
def test_extractive_qa_beats_first_word(pretrained: tuple[Path, Any], tmp_path: Path) -> None:
    init, tasks = pretrained
    run = finetune(tmp_path, init, "extractive-qa", *tasks["qa"], ["training.maxSteps=300"])
    rows = [json.loads(x) for x in Path(tasks["qa"][1]).read_text().splitlines()]
    first_word = qa_scores([r["context"].split()[0] for r in rows], [r["answers"]["text"] for r in rows])
    m = final_metrics(run)
    assert m["exact_match"] >= first_word["exact_match"] + 0.2, (m, first_word)


def test_csv_labelled_rows_and_held_out_split(tmp_path: Path) -> None:
    rows = "text,label\n" + "".join(f"line {i},{'even' if i % 2 == 0 else 'odd'}\n" for i in range(200))
    (tmp_path / "cls.csv").write_text(rows)
    data = DataSpec(sources=[DataSourceSpec(uri=str(tmp_path / "cls.csv"))], sequence_length=8, validation_split=0.25)
    train, val, names = tasks.load_labeled(
        ObjectiveSpec(type="sequence-classification"), data, bytes_tokenizer(), seed=3
    )
    assert names == ["even", "odd"]
    assert len(train) + len(val) == 200 and 30 <= len(val) <= 70
    assert train.features["input_ids"].shape == (len(train), 8)
    again = tasks.load_labeled(ObjectiveSpec(type="sequence-classification"), data, bytes_tokenizer(), seed=3)[1]
    assert again.gold == val.gold, "the split is deterministic"
