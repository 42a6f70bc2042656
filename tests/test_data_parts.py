"""Preparation in parts (issue 28 item 1): the units of work, ranges of large files read line
by line exactly once, workers that share the units and make the same dataset as one process,
and a commit that refuses a missing, torn or foreign part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain.api.spec import DataSourceSpec, DataSpec
from pretrain.data import units
from pretrain.data.parts import commit, part_name, prepare_part
from pretrain.data.prepare import prepare
from pretrain.data.sources import DataError
from pretrain.data.tokenizer import bytes_tokenizer, fingerprint
from pretrain.data.units import Unit, plan_units, resolve_inputs, unit_documents


def records(n: int) -> str:
    return "".join(json.dumps({"text": f"record {i} " + "é" * (i % 7) + "x" * (i % 13)}) + "\n" for i in range(n))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), unit=st.integers(1, 400), tail_newline=st.booleans())
def test_byte_ranges_hold_every_line_once(tmp_path_factory: pytest.TempPathFactory, n: int, unit: int,
                                          tail_newline: bool) -> None:  # fmt: skip
    """Whatever the unit size, the ranges of a JSONL file give its records once each, in order
    (a range that starts mid-line, even mid-character, leaves that line to the one before)."""
    path = tmp_path_factory.mktemp("ranges") / "c.jsonl"
    text = records(n)
    path.write_text(text if tail_newline else text.rstrip("\n"))
    src = DataSourceSpec(uri=str(path))
    f = units.SourceFile(str(path), path.stat().st_size, "v")
    ranges = [Unit(0, f, a, min(a + unit, f.size)) for a in range(0, f.size, unit)]
    got = [doc for r in ranges for doc in unit_documents(src, r)]
    assert got == [json.loads(line)["text"] for line in text.splitlines()]


def test_a_range_of_plain_text_holds_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    lines = [f"line {i} {'ü' * (i % 5)}\n" for i in range(200)]
    path.write_text("".join(lines))
    src, f = DataSourceSpec(uri=str(path)), units.SourceFile(str(path), path.stat().st_size, "v")
    got = "".join(d for a in range(0, f.size, 97) for d in unit_documents(src, Unit(0, f, a, min(a + 97, f.size))))
    assert got == "".join(lines)


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DataSpec:
    """Two sources: a JSONL file of ~40 KB cut into 4 KB units, and two small text files."""
    monkeypatch.setattr(units, "UNIT_BYTES", 4096)
    (tmp_path / "a.jsonl").write_text(records(900))
    for k in range(2):
        (tmp_path / f"b{k}.txt").write_text(f"text file {k}. " * 300)
    return DataSpec(sources=[DataSourceSpec(uri=str(tmp_path / "a.jsonl"), weight=2.0),
                             DataSourceSpec(uri=str(tmp_path / "b*.txt"))],
                    sequence_length=16, validationSplit=0.1)  # fmt: skip


def test_any_number_of_workers_makes_the_same_dataset(corpus: DataSpec, tmp_path: Path) -> None:
    tok = bytes_tokenizer()
    inputs = resolve_inputs(corpus, fingerprint(tok))
    planned = plan_units(corpus, inputs)
    assert len(planned) > 10 and {u.source for u in planned} == {0, 1}
    assert [u.end for u in planned if u.source == 1] == [None, None], "small files are whole units"
    one = json.loads(
        (prepare(corpus, tok, fingerprint(tok), tmp_path / "one", shard_rows=64) / "manifest.json").read_text()
    )
    for count in (2, 3):
        out = tmp_path / f"by-{count}"
        for k in reversed(range(count)):  # any order
            prepare_part(corpus, tok, inputs, out, k, count, shard_rows=64)
        manifest = commit(corpus, inputs, out, count, fingerprint(tok))
        assert manifest["splits"] == one["splits"] and manifest["sources"] == one["sources"], count
        for s in manifest["splits"]["train"]["shards"]:
            assert (out / s["file"]).read_bytes() == (tmp_path / "one" / one["fingerprint"] / s["file"]).read_bytes()
    assert one["units"] == len(planned) and one["sources"][0]["weight"] == 2.0


def test_the_commit_names_what_is_missing_or_foreign(corpus: DataSpec, tmp_path: Path) -> None:
    tok = bytes_tokenizer()
    inputs = resolve_inputs(corpus, fingerprint(tok))
    out = tmp_path / "parts"
    for k in (0, 2):
        prepare_part(corpus, tok, inputs, out, k, 3)
    with pytest.raises(DataError, match=r"part-00001-of-00003.json: this part is missing: run its worker"):
        commit(corpus, inputs, out, 3, fingerprint(tok))
    (out / part_name(1, 3)).write_text('{"fingerprint": ')  # torn
    with pytest.raises(DataError, match=r"part-00001-of-00003.json: unreadable part manifest"):
        commit(corpus, inputs, out, 3, fingerprint(tok))
    before = (out / part_name(1, 3)).stat().st_mtime_ns
    prepare_part(corpus, tok, inputs, out, 1, 3)  # the retried worker makes it again
    assert (out / part_name(1, 3)).stat().st_mtime_ns != before
    kept = (out / part_name(1, 3)).stat().st_mtime_ns
    prepare_part(corpus, tok, inputs, out, 1, 3)  # a whole part is kept
    assert (out / part_name(1, 3)).stat().st_mtime_ns == kept
    commit(corpus, inputs, out, 3, fingerprint(tok))
    other = resolve_inputs(corpus.model_copy(update={"sequence_length": 32}), fingerprint(tok))
    with pytest.raises(DataError, match=rf"prepared for dataset {inputs.fingerprint}, not {other.fingerprint}"):
        commit(corpus, other, out, 3, fingerprint(tok))
    with pytest.raises(DataError, match=r"worker index 3 is not in 0..2"):
        prepare_part(corpus, tok, inputs, out, 3, 3)
