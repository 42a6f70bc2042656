"""Generated documents are up to date."""

from __future__ import annotations

import re
from pathlib import Path

from pretrain.api.reference import reference
from tests.conftest import ROOT


def test_reference_is_current() -> None:
    assert (ROOT / "docs" / "reference.md").read_text() == reference() + "\n", "run `make generate`"


def test_reference_documents_every_field() -> None:
    text = reference()
    for field in ("globalBatchSize", "credentialsSecret", "cleanPodPolicy", "metricsPort", "tokensPerSecond"):
        assert f"`{field}`" in text


SAMPLE = re.compile(r"<!-- sample: (docs/samples/[\w.-]+) -->\s*\n```[a-z]*\n(.*?)```", re.S)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_sample_outputs_in_the_docs_come_from_captured_runs() -> None:
    """Every block marked as a sample is made of lines of the captured file, in order ("..."
    stands for lines left out); docs/samples/capture.py captured them from real runs."""
    found = 0
    for doc in documents():
        for source, block in SAMPLE.findall(doc.read_text()):
            captured = (ROOT / source).read_text().splitlines()
            at = 0
            for line in block.splitlines():
                if line.strip() in ("", "..."):
                    continue
                assert line in captured[at:], f"{doc.name}: {line!r} is not in {source} (after line {at})"
                at = captured.index(line, at) + 1
            found += 1
    assert found >= 2, "the quickstart and the README show captured samples"


def test_no_output_table_without_its_capture() -> None:
    """A `kubectl get ptj` table (its header) appears only inside a captured sample."""
    header = re.compile(r"^NAME\s+PHASE\s+STEP", re.M)
    for doc in documents():
        text = SAMPLE.sub("", doc.read_text())
        assert not header.search(text), f"{doc.name} shows a kubectl get ptj table that no capture produced"
