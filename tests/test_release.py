"""The image names users meet (the chart, the CRD's default, the examples, the docs) are the ones
the release workflow publishes, at the chart's appVersion; the Dockerfiles it builds exist and
install from the project's metadata."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import yaml
from packaging.requirements import Requirement

from pretrain.api.spec import ResourcesSpec
from tests.conftest import ROOT


def published() -> dict[str, str]:
    """image name -> Dockerfile, from the release workflow's matrix."""
    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yaml").read_text())
    prefix = flow["env"]["IMAGE_PREFIX"]
    return {f"{prefix}/{m['name']}": m["dockerfile"] for m in flow["jobs"]["images"]["strategy"]["matrix"]["include"]}


def app_version() -> str:
    return str(yaml.safe_load((ROOT / "charts" / "pretrain-operator" / "Chart.yaml").read_text())["appVersion"])


def test_every_image_a_user_is_pointed_at_is_published() -> None:
    names, version = published(), app_version()
    assert all((ROOT / dockerfile).is_file() for dockerfile in names.values())
    values = yaml.safe_load((ROOT / "charts" / "pretrain-operator" / "values.yaml").read_text())
    assert values["image"]["repository"] in names and values["image"]["tag"] in ("", version)
    referenced = {str(ResourcesSpec.model_fields["image"].default)}
    for path in [*(ROOT / "examples").glob("*.yaml"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]:
        referenced |= set(re.findall(r"ghcr\.io/pretrain-io/[a-z0-9-]+:[0-9A-Za-z.]+", path.read_text()))
    assert referenced, "the examples name images"
    for ref in referenced:
        name, tag = ref.rsplit(":", 1)
        assert name in names, f"{ref} is not built by the release workflow"
        assert tag == version, f"{ref}: the release publishes {version}"


def test_images_install_from_the_project_metadata() -> None:
    for dockerfile in set(published().values()):
        text = Path(ROOT / dockerfile).read_text()
        assert re.search(r"^ARG BASE=\S+", text, re.M) and "FROM ${BASE}" in text, dockerfile
        assert re.search(r"requirements\.py pyproject\.toml (operator|trainer) > requirements\.txt", text), dockerfile
        assert "pip install --no-compile -r requirements.txt" in text, f"{dockerfile}: dependencies from pyproject"
        # the source last, into the layer above the dependencies: nothing installed twice
        assert text.index("COPY src") > text.index("-r requirements.txt"), dockerfile
        assert "pip install --no-compile --no-deps ." in text, dockerfile
        # no second list of pinned packages beside pyproject.toml
        assert not re.search(r"pip install[^\n]*\b(transformers|deepspeed|kopf)==", text), dockerfile


def test_the_images_requirements_are_the_packages_own() -> None:
    """docker/requirements.py prints what pip itself reads from the installed package's metadata."""

    def normal(r: Requirement) -> tuple[str, str, frozenset[str]]:
        return r.name.lower(), str(r.specifier), frozenset(r.extras)

    meta = [Requirement(r) for r in requires("pretrain") or []]
    for extra in ("operator", "trainer"):
        printed = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"),
                                  str(ROOT / "pyproject.toml"), extra], capture_output=True, text=True, check=True)  # fmt: skip
        want = {normal(r) for r in meta if r.marker is None or r.marker.evaluate({"extra": extra})}
        assert {normal(Requirement(line)) for line in printed.stdout.splitlines()} == want, extra
