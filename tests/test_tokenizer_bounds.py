"""Pretrained tokenizers are bounded before anything is loaded (issue 33, item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pretrain.cli import main
from pretrain.data.tokenizer import bytes_tokenizer
from tests.conftest import ROOT

TINY = str(ROOT / "examples" / "tiny-cpu.yaml")


def saved_tokenizer(folder: Path, edit: object = None) -> Path:
    bytes_tokenizer().save_pretrained(str(folder))
    if edit is not None:
        data = json.loads((folder / "tokenizer.json").read_text())
        edit(data)  # type: ignore[operator]
        (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def validate(path: Path | str, *more: str) -> tuple[int, list[str]]:
    args = ["validate", TINY, "--set", "tokenizer.type=pretrained", "--set", f"tokenizer.path={path}",
            "--set", "checkpoint.uri=s3://b/ck", *more]  # fmt: skip
    result = CliRunner().invoke(main, args)
    return result.exit_code, (result.stderr or result.output).strip().splitlines()


def huge_id(data: dict) -> None:  # type: ignore[type-arg]
    data["model"]["vocab"]["Ā"] = 4_000_000_000


def too_many(data: dict) -> None:  # type: ignore[type-arg]
    data["model"]["vocab"] = {f"t{i}": i for i in range(2_100_000)}


def test_a_plain_tokenizer_passes(tmp_path: Path) -> None:
    code, lines = validate(saved_tokenizer(tmp_path / "tok"))
    assert code == 0 and lines[-1].endswith("ok (tiny-cpu, gpt2, 2 processes)"), lines


@pytest.mark.parametrize(
    ("edit", "more", "says"),
    [
        (huge_id, (), "token id 4000000000 does not fit the largest vocabulary a model may have (2097152)"),
        (too_many, (), "2100000 tokens, more than the largest vocabulary a model may have (2097152)"),
        (None, ("--set", "model.vocabSize=128"), "260 tokens, more than model.vocabSize (128)"),
    ],
)
def test_absurd_tokenizers_are_refused_in_one_line(tmp_path: Path, edit: object, more: tuple[str, ...],
                                                   says: str) -> None:  # fmt: skip
    """Before: ids reaching 4e9 made fingerprint() allocate 8 GiB and abort; 3M entries built
    a 192M-parameter embedding; `pretrain validate` said ok to both."""
    path = saved_tokenizer(tmp_path / "tok", edit)
    code, lines = validate(path, *more)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0] == f"error: {TINY}: spec.tokenizer.path: {path}: {says}"


def test_loops_and_missing_folders(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    code, lines = validate(loop)
    assert code == 1 and lines == [f"error: {TINY}: spec.tokenizer.path: {loop}: a symbolic link loop"]
    # A path that is not here passes validate (a cluster job's path is in its pod) and fails at start.
    from pretrain.api.validation import SpecError
    from pretrain.data.tokenizer_bounds import check_tokenizer_path

    code, lines = validate(tmp_path / "nowhere")
    assert code == 0, lines
    with pytest.raises(SpecError, match=r"nowhere: no such folder"):
        check_tokenizer_path(str(tmp_path / "nowhere"))
    check_tokenizer_path("gpt2")  # a hub name: checked once loaded
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(SpecError, match="not a folder"):
        check_tokenizer_path(str(tmp_path / "file.json"))


def test_data_prepare_refuses_before_loading(tmp_path: Path) -> None:
    """At start (here `pretrain data prepare`, which builds the job's tokenizer as the trainer does)."""
    path = saved_tokenizer(tmp_path / "tok", huge_id)
    result = CliRunner().invoke(main, ["data", "prepare", TINY, "--set", "tokenizer.type=pretrained",
                                       "--set", f"tokenizer.path={path}", "--output", str(tmp_path / "out")])  # fmt: skip
    lines = (result.stderr or result.output).strip().splitlines()
    assert result.exit_code == 1 and lines[-1].startswith("error: spec.tokenizer.path: "), lines
    assert "token id 4000000000" in lines[-1]
