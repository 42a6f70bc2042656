"""Generated documents are up to date."""

from __future__ import annotations

from pretrain.api.reference import reference
from tests.conftest import ROOT


def test_reference_is_current() -> None:
    assert (ROOT / "docs" / "reference.md").read_text() == reference() + "\n", "run `make generate`"


def test_reference_documents_every_field() -> None:
    text = reference()
    for field in ("globalBatchSize", "credentialsSecret", "cleanPodPolicy", "metricsPort", "tokensPerSecond"):
        assert f"`{field}`" in text
