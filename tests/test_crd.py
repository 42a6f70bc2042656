"""The generated CRD: in sync with crds/, structural, valid for Kubernetes 1.30-1.35, and
accepting every example while refusing bad ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate as kv
import pytest
import yaml

from pretrain.api.crd import crd, crd_yaml
from tests.conftest import EXAMPLES, ROOT

KUBE_VERSIONS = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35"]


def openapi_schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_checked_in_crd_is_current() -> None:
    assert (ROOT / "crds" / "pretrainjob.yaml").read_text() == crd_yaml(), "run `make crd` and commit crds/"


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_crd_validates_strictly(version: str) -> None:
    assert kv.validate(crd(), version, strict=True) == version


def _walk(node: Any, path: str = "") -> list[str]:
    """Every violation of the apiserver's structural-schema rules under `node`."""
    bad: list[str] = []
    if not isinstance(node, dict):
        return bad
    for key in ("$ref", "$defs", "definitions", "title", "const"):
        if key in node:
            bad.append(f"{path}: has {key}")
    for combinator in ("anyOf", "oneOf", "allOf", "not"):
        if combinator in node and not node.get("x-kubernetes-int-or-string"):
            bad.append(f"{path}: {combinator} declares types")
    typed = "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    if not typed:
        bad.append(f"{path}: no type")
    if node.get("type") == "null":
        bad.append(f"{path}: null type")
    if "properties" in node and "additionalProperties" in node:
        bad.append(f"{path}: properties beside additionalProperties")
    for name, sub in node.get("properties", {}).items():
        bad += _walk(sub, f"{path}.{name}")
    if "items" in node:
        bad += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        bad += _walk(node["additionalProperties"], f"{path}{{}}")
    return bad


def test_schema_is_structural() -> None:
    assert _walk(openapi_schema()) == []


def test_crd_names_and_columns() -> None:
    spec = crd()["spec"]
    assert spec["names"]["shortNames"] == ["ptj"]
    assert spec["group"] == "pretrain.io"
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase", "Nodes", "Step", "Loss", "Tokens/s", "Restarts", "Reason", "Age", "Message",
    ]  # fmt: skip
    rules = openapi_schema()["properties"]["spec"]["x-kubernetes-validations"]
    assert all(r["message"] and r["rule"] for r in rules)
    assert openapi_schema()["properties"]["spec"]["properties"]["model"]["x-kubernetes-validations"][0]["rule"] == (
        "self == oldSelf"
    )


def _errors(doc: Any) -> list[tuple[list[Any], str]]:
    # OpenAPI v3.0 schemas use draft-4 style boolean exclusiveMinimum.
    return [(list(e.path), e.message) for e in jsonschema.Draft4Validator(openapi_schema()).iter_errors(doc)]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_match_crd_schema(path: Path) -> None:
    assert _errors(yaml.safe_load(path.read_text())) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (("training", "zero", "stage"), 5),
        (("training", "optimizer", "lr"), 0),
        (("training", "precision"), "fp8"),
        (("resources", "nodes"), 0),
        (("checkpoint", "credentialsSecret"), "Bad_Name"),
        (("model", "dropout"), 1.0),
    ],
)
def test_crd_schema_rejects_bad_values(field: tuple[str, ...], value: Any) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    node = doc["spec"]
    for key in field[:-1]:
        node = node.setdefault(key, {})
    node[field[-1]] = value
    errors = _errors(doc)
    assert errors and errors[0][0] == ["spec", *field]


def test_defaults_match_models() -> None:
    props = openapi_schema()["properties"]["spec"]["properties"]
    assert props["training"]["properties"]["globalBatchSize"]["default"] == 8
    assert props["training"]["default"] == {}
    assert props["checkpoint"]["properties"]["resume"] == {
        "default": "auto",
        "description": props["checkpoint"]["properties"]["resume"]["description"],
        "x-kubernetes-int-or-string": True,
    }
