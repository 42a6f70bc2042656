"""Fixtures: one emulator per module (with the PretrainJob CRD), clients pointed at it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kubeapi.harness import start_apiserver
from tests.kubeapi.server import ApiServer


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = start_apiserver(tmp_path_factory.mktemp("apiserver"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api: ApiServer) -> Any:
    import kubernetes

    return kubernetes.config.new_client_from_config(config_file=str(api.kubeconfig))


class Raw:
    """Plain HTTP against the emulator, for the content types and paths clients send."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self, method: str, path: str, body: Any = None, ctype: str = "application/json",
                 headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": ctype, **(headers or {})})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null"), dict(resp.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null"), dict(e.headers)


@pytest.fixture(scope="module")
def raw(api: ApiServer) -> Raw:
    return Raw(api.url)


def crd_path() -> Path:
    from tests.conftest import ROOT

    return ROOT / "crds" / "pretrainjob.yaml"
