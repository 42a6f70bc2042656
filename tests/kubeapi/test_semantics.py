"""The emulator keeps the API server's documented semantics; each test pins one of them.

References are to the Kubernetes API concepts and conventions pages (kubernetes.io/docs/reference/
using-api/api-concepts, community api-conventions.md), the garbage collection and finalizers
concept pages, the CRD validation page (structural schemas, defaulting, pruning, CEL rules) and
the pod termination section of the pod lifecycle page.
"""

from __future__ import annotations

import base64
import copy
import json
import time
import urllib.request
from typing import Any

import pytest

from tests.kubeapi.conftest import Raw
from tests.kubeapi.server import ApiServer
from tests.operator.harness import job_manifest

JOBS = "/apis/pretrain.io/v1alpha1/namespaces/default/pretrainjobs"
CMS = "/api/v1/namespaces/default/configmaps"
PODS = "/api/v1/namespaces/default/pods"


def job(name: str, **overrides: Any) -> dict[str, Any]:
    """The tiny example named `name`; keyword overrides spell dotted paths with "__"."""
    return job_manifest(name, {k.replace("__", "."): v for k, v in overrides.items()})


def cm(name: str, labels: dict[str, str] | None = None, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
                                    "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]  # fmt: skip
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}}


def pod(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "busybox"}], "terminationGracePeriodSeconds": 30}}  # fmt: skip


def watch_events(api: ApiServer, path: str, seconds: float = 1.0) -> list[dict[str, Any]]:
    """Read a watch stream for a while (the server closes it at timeoutSeconds)."""
    sep = "&" if "?" in path else "?"
    url = f"{api.url}{path}{sep}watch=true&timeoutSeconds={max(1, int(seconds))}"
    with urllib.request.urlopen(url, timeout=seconds + 10) as resp:
        return [json.loads(line) for line in resp.read().decode().splitlines() if line.strip()]


# ---------------------------------------------------------------------- discovery


def test_discovery_lists_core_and_crd_resources_with_subresources(raw: Raw) -> None:
    code, core, _ = raw("GET", "/api/v1")
    names = {r["name"] for r in core["resources"]}
    assert code == 200 and {"pods", "pods/status", "pods/binding", "services", "configmaps", "events", "secrets",
                            "namespaces"} <= names  # fmt: skip
    _, groups, _ = raw("GET", "/apis")
    assert "pretrain.io" in {g["name"] for g in groups["groups"]}
    _, ptj, _ = raw("GET", "/apis/pretrain.io/v1alpha1")
    res = {r["name"]: r for r in ptj["resources"]}
    assert res["pretrainjobs"]["shortNames"] == ["ptj"] and res["pretrainjobs"]["namespaced"]
    assert "pretrainjobs/status" in res


def test_a_crd_is_served_only_while_installed(raw: Raw) -> None:
    """PodMonitor exists only where the Prometheus Operator's CRD is installed."""
    assert raw("GET", "/apis/monitoring.coreos.com/v1/namespaces/default/podmonitors")[0] == 404
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "podmonitors.monitoring.coreos.com"},
           "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                    "names": {"plural": "podmonitors", "singular": "podmonitor", "kind": "PodMonitor", "listKind": "PodMonitorList"},
                    "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                        "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}  # fmt: skip
    assert raw("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)[0] == 201
    assert raw("GET", "/apis/monitoring.coreos.com/v1/namespaces/default/podmonitors")[0] == 200
    assert (
        raw("DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/podmonitors.monitoring.coreos.com")[0]
        == 200
    )
    assert raw("GET", "/apis/monitoring.coreos.com/v1/namespaces/default/podmonitors")[0] == 404


# ---------------------------------------------------------------------- create, get, delete, list


def test_create_conflicts_and_missing_objects(raw: Raw) -> None:
    code, obj, _ = raw("POST", CMS, cm("c-exists"))
    assert code == 201 and obj["metadata"]["uid"] and obj["metadata"]["resourceVersion"]
    assert obj["metadata"]["creationTimestamp"].endswith("Z")
    code, status, _ = raw("POST", CMS, cm("c-exists"))
    assert (code, status["reason"]) == (409, "AlreadyExists")
    assert raw("GET", f"{CMS}/nope")[1]["reason"] == "NotFound"
    assert raw("DELETE", f"{CMS}/nope")[0] == 404
    assert raw("POST", "/api/v1/namespaces/absent/configmaps", cm("x"))[0] == 404, "the namespace must exist"


def test_list_filters_by_label_selector(raw: Raw) -> None:
    for name, labels in (("sel-a", {"app": "a", "tier": "x"}), ("sel-b", {"app": "b"}), ("sel-c", {"tier": "y"})):
        raw("POST", CMS, cm(name, labels))

    def names(selector: str) -> list[str]:
        _, lst, _ = raw("GET", f"{CMS}?labelSelector={urllib.request.quote(selector)}")
        return sorted(o["metadata"]["name"] for o in lst["items"] if o["metadata"]["name"].startswith("sel-"))

    assert names("app=a") == ["sel-a"]
    assert names("app!=a") == ["sel-b", "sel-c"], "!= matches objects without the label too"
    assert names("app in (a,b)") == ["sel-a", "sel-b"]
    assert names("app notin (a)") == ["sel-b", "sel-c"]
    assert names("tier") == ["sel-a", "sel-c"] and names("!tier") == ["sel-b"]
    assert names("app=a,tier=x") == ["sel-a"]


# ---------------------------------------------------------------------- updates and patches


def test_stale_resource_version_is_a_conflict(raw: Raw) -> None:
    _, obj, _ = raw("POST", CMS, cm("c-rv"))
    first = copy.deepcopy(obj)
    obj["data"] = {"k": "2"}
    code, updated, _ = raw("PUT", f"{CMS}/c-rv", obj)
    assert code == 200 and int(updated["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    first["data"] = {"k": "3"}
    code, status, _ = raw("PUT", f"{CMS}/c-rv", first)
    assert (code, status["reason"]) == (409, "Conflict")
    del first["metadata"]["resourceVersion"]  # an unconditional update is allowed
    assert raw("PUT", f"{CMS}/c-rv", first)[0] == 200


def test_merge_patch_follows_rfc_7386(raw: Raw) -> None:
    body = cm("c-merge")
    body["data"] = {"a": "1", "b": "2"}
    body["metadata"]["labels"] = {"x": "1"}
    raw("POST", CMS, body)
    code, obj, _ = raw("PATCH", f"{CMS}/c-merge", {"data": {"a": None, "c": "3"}, "metadata": {"labels": {"y": "2"}}},
                       "application/merge-patch+json")  # fmt: skip
    assert code == 200 and obj["data"] == {"b": "2", "c": "3"} and obj["metadata"]["labels"] == {"x": "1", "y": "2"}


def test_json_patch_follows_rfc_6902(raw: Raw) -> None:
    raw("POST", CMS, cm("c-json"))
    ops = [{"op": "add", "path": "/data/n", "value": "1"}, {"op": "remove", "path": "/data/k"}]
    code, obj, _ = raw("PATCH", f"{CMS}/c-json", ops, "application/json-patch+json")
    assert code == 200 and obj["data"] == {"n": "1"}
    code, _, _ = raw(
        "PATCH", f"{CMS}/c-json", [{"op": "test", "path": "/data/n", "value": "2"}], "application/json-patch+json"
    )
    assert code == 422, "a failed test operation rejects the whole patch"


def test_custom_resources_refuse_strategic_merge_patch(raw: Raw) -> None:
    raw("POST", JOBS, job("smp"))
    code, status, _ = raw("PATCH", f"{JOBS}/smp", {"spec": {}}, "application/strategic-merge-patch+json")
    assert (code, status["reason"]) == (415, "UnsupportedMediaType")


def test_generation_counts_spec_changes_only(raw: Raw) -> None:
    _, obj, _ = raw("POST", JOBS, job("gen"))
    assert obj["metadata"]["generation"] == 1
    _, obj, _ = raw("PATCH", f"{JOBS}/gen", {"metadata": {"labels": {"a": "b"}}}, "application/merge-patch+json")
    assert obj["metadata"]["generation"] == 1
    _, obj, _ = raw("PATCH", f"{JOBS}/gen/status", {"status": {"phase": "Running"}}, "application/merge-patch+json")
    assert obj["metadata"]["generation"] == 1
    _, obj, _ = raw("PATCH", f"{JOBS}/gen", {"spec": {"training": {"maxSteps": 7}}}, "application/merge-patch+json")
    assert obj["metadata"]["generation"] == 2


def test_status_subresource_separates_spec_and_status(raw: Raw) -> None:
    body = job("sub")
    body["status"] = {"phase": "Succeeded"}
    _, obj, _ = raw("POST", JOBS, body)
    assert "status" not in obj, "status on create is dropped when status is a subresource"
    _, obj, _ = raw("PATCH", f"{JOBS}/sub", {"status": {"phase": "Failed"}}, "application/merge-patch+json")
    assert "status" not in obj, "writes to the object ignore status"
    _, obj, _ = raw("PATCH", f"{JOBS}/sub/status", {"status": {"phase": "Running", "restarts": 1},
                                                  "spec": {"training": {"maxSteps": 9}}}, "application/merge-patch+json")  # fmt: skip
    assert obj["status"] == {"phase": "Running", "restarts": 1}
    assert obj["spec"]["training"]["maxSteps"] == 500, "writes to /status ignore the spec"
    obj["status"] = {"phase": "Pending"}
    _, obj, _ = raw("PUT", f"{JOBS}/sub/status", obj)
    assert obj["status"] == {"phase": "Pending"}


# ---------------------------------------------------------------------- watches


def test_watch_replays_from_a_resource_version_and_follows_selectors(api: ApiServer, raw: Raw) -> None:
    _, lst, _ = raw("GET", f"{CMS}?labelSelector=w%3D1")
    rv = lst["metadata"]["resourceVersion"]
    raw("POST", CMS, cm("c-watch", {"w": "1"}))
    raw("PATCH", f"{CMS}/c-watch", {"data": {"k": "2"}}, "application/merge-patch+json")
    raw("PATCH", f"{CMS}/c-watch", {"metadata": {"labels": {"w": "2"}}}, "application/merge-patch+json")
    raw("PATCH", f"{CMS}/c-watch", {"metadata": {"labels": {"w": "1"}}}, "application/merge-patch+json")
    raw("DELETE", f"{CMS}/c-watch")
    evs = watch_events(api, f"{CMS}?labelSelector=w%3D1&resourceVersion={rv}")
    assert [e["type"] for e in evs] == ["ADDED", "MODIFIED", "DELETED", "ADDED", "DELETED"], (
        "leaving a selector is DELETED for that watch, entering it is ADDED"
    )
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in evs]
    assert versions == sorted(versions) and versions[0] > int(rv)


def test_watch_without_a_version_starts_with_the_current_state(api: ApiServer, raw: Raw) -> None:
    raw("POST", CMS, cm("c-initial", {"initial": "yes"}))
    evs = watch_events(api, f"{CMS}?labelSelector=initial%3Dyes")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in evs] == [("ADDED", "c-initial")]


def test_watch_from_a_compacted_version_is_gone(api: ApiServer, raw: Raw) -> None:
    _, lst, _ = raw("GET", CMS)
    raw("POST", CMS, cm("c-compact"))
    api.call(lambda s: s.compact())
    evs = watch_events(api, f"{CMS}?resourceVersion={lst['metadata']['resourceVersion']}")
    assert evs[0]["type"] == "ERROR" and evs[0]["object"]["code"] == 410


# ---------------------------------------------------------------------- deletion


def test_finalizers_hold_deletion_until_removed(api: ApiServer, raw: Raw) -> None:
    body = cm("c-final")
    body["metadata"]["finalizers"] = ["example.com/hold"]
    raw("POST", CMS, body)
    code, obj, _ = raw("DELETE", f"{CMS}/c-final")
    assert code == 200 and obj["metadata"]["deletionTimestamp"]
    assert raw("GET", f"{CMS}/c-final")[0] == 200, "still there while a finalizer remains"
    code, _, _ = raw("PATCH", f"{CMS}/c-final", {"metadata": {"finalizers": ["example.com/hold", "late"]}},
                     "application/merge-patch+json")  # fmt: skip
    assert code == 422, "no new finalizers once deletion started"
    raw("PATCH", f"{CMS}/c-final", {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    assert raw("GET", f"{CMS}/c-final")[0] == 404


def _wait_gone(raw: Raw, path: str, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if raw("GET", path)[0] == 404:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("policy", ["Background", "Foreground", "Orphan"])
def test_owner_references_are_garbage_collected(raw: Raw, policy: str) -> None:
    name = f"owner-{policy.lower()}"
    _, owner, _ = raw("POST", JOBS, job(name))
    raw("POST", CMS, cm(f"{name}-dep", owner=owner))
    code, obj, _ = raw("DELETE", f"{JOBS}/{name}", {"propagationPolicy": policy})
    assert code == 200
    if policy == "Foreground":
        assert "foregroundDeletion" in obj["metadata"]["finalizers"], "the owner waits for its dependents"
    assert _wait_gone(raw, f"{JOBS}/{name}")
    if policy == "Orphan":
        time.sleep(0.3)
        code, dep, _ = raw("GET", f"{CMS}/{name}-dep")
        assert code == 200 and not dep["metadata"].get("ownerReferences")
    else:
        assert _wait_gone(raw, f"{CMS}/{name}-dep")


def test_a_bound_pod_terminates_gracefully_an_unbound_one_goes_at_once(raw: Raw) -> None:
    raw("POST", PODS, pod("p-unbound"))
    assert raw("DELETE", f"{PODS}/p-unbound")[0] == 200 and raw("GET", f"{PODS}/p-unbound")[0] == 404
    raw("POST", PODS, pod("p-bound"))
    assert raw("POST", f"{PODS}/p-bound/binding", {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p-bound"},
                                                    "target": {"kind": "Node", "name": "n1"}})[0] == 201  # fmt: skip
    _, obj, _ = raw("DELETE", f"{PODS}/p-bound")
    assert obj["metadata"]["deletionTimestamp"] and obj["metadata"]["deletionGracePeriodSeconds"] == 30
    assert raw("GET", f"{PODS}/p-bound")[0] == 200, "the kubelet has not confirmed yet"
    raw("DELETE", f"{PODS}/p-bound?gracePeriodSeconds=0")
    assert raw("GET", f"{PODS}/p-bound")[0] == 404


def test_pods_are_checked_against_the_official_schema_and_their_spec_is_immutable(raw: Raw) -> None:
    bad = pod("p-bad")
    bad["spec"]["containers"][0]["imagePullPolicy"] = 7
    code, status, _ = raw("POST", PODS, bad)
    assert code == 422 and "imagePullPolicy" in status["message"]
    _, obj, _ = raw("POST", PODS, pod("p-immutable"))
    obj["spec"]["restartPolicy"] = "Never"
    assert raw("PUT", f"{PODS}/p-immutable", obj)[0] == 422


def test_secret_string_data_is_stored_as_base64_data(raw: Raw) -> None:
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s1"}, "stringData": {"key": "value"}}
    _, obj, _ = raw("POST", "/api/v1/namespaces/default/secrets", body)
    assert "stringData" not in obj and base64.b64decode(obj["data"]["key"]) == b"value"


# ---------------------------------------------------------------------- CRD admission


def test_crd_schema_defaults_and_prunes(raw: Raw) -> None:
    body = job("defaults")
    body["spec"]["unknownField"] = 1
    code, obj, headers = raw("POST", JOBS, body)
    assert code == 201 and "unknownField" not in obj["spec"]
    assert 'unknown field \\"spec.unknownField\\"' in json.dumps(
        headers.get("Warning", "")
    ) or "unknownField" in headers.get("Warning", "")
    assert obj["spec"]["runPolicy"]["maxRestarts"] == 3 and obj["spec"]["model"]["dropout"] == 0.0, "defaults filled"
    body["metadata"]["name"] = "strict"
    code, status, _ = raw("POST", JOBS + "?fieldValidation=Strict", body)
    assert code == 400 and status["message"].endswith('strict decoding error: unknown field "spec.unknownField"')


def test_crd_schema_types_and_ranges(raw: Raw) -> None:
    code, status, _ = raw("POST", JOBS, job("badrange", training__microBatchSize=0))
    assert code == 422 and status["reason"] == "Invalid"
    assert status["message"] == ('PretrainJob.pretrain.io "badrange" is invalid: spec.training.microBatchSize: Invalid value: 0: '
                                 "spec.training.microBatchSize in body should be greater than or equal to 1")  # fmt: skip
    code, status, _ = raw("POST", JOBS, job("badtype", training__maxSteps="many"))
    assert code == 422 and "must be of type integer" in status["message"]
    code, status, _ = raw("POST", JOBS, job("badenum", model__family="rnn"))
    assert code == 422 and 'Unsupported value: "rnn"' in status["message"]


def test_crd_cel_rules_and_transition_rules(raw: Raw) -> None:
    code, status, _ = raw("POST", JOBS, job("celbatch", training__globalBatchSize=30))
    assert code == 422
    assert status["details"]["causes"][0]["field"] == "spec.training.globalBatchSize"
    assert "divisible by microBatchSize x nodes x procsPerNode" in status["message"]
    code, status, _ = raw("POST", JOBS, job("x" * 46))
    assert code == 422 and "at most 45 characters" in status["message"], "a rule on metadata.name at the root"
    code, status, _ = raw("POST", JOBS, job("celrule", runPolicy__failurePolicy={"rules": [{"action": "FailJob"}]}))
    assert code == 422, "a rule on the items of a list"
    assert status["details"]["causes"][0]["field"] == "spec.runPolicy.failurePolicy.rules[0]"
    assert "a rule needs onExitCodes or onReasons" in status["message"]
    code, status, _ = raw("POST", JOBS, job("celzero", runPolicy__failurePolicy={
        "rules": [{"action": "RestartJobIgnore", "onReasons": ["Evicted"]},
                  {"action": "FailJob", "onExitCodes": {"values": [0]}}]}))  # fmt: skip
    assert code == 422 and status["details"]["causes"][0]["field"] == "spec.runPolicy.failurePolicy.rules[1]"
    assert "0 is not a failure" in status["message"], "the operator: In is filled in by default before CEL runs"
    raw("POST", JOBS, job("immutable"))
    code, status, _ = raw(
        "PATCH", f"{JOBS}/immutable", {"spec": {"model": {"layers": 8}}}, "application/merge-patch+json"
    )
    assert code == 422 and "model is immutable" in status["message"], "oldSelf rules run on update"
    code, _, _ = raw(
        "PATCH", f"{JOBS}/immutable", {"spec": {"training": {"maxSteps": 10}}}, "application/merge-patch+json"
    )
    assert code == 200, "mutable fields stay mutable"


def test_tables_use_the_crd_printer_columns(raw: Raw) -> None:
    raw("POST", JOBS, job("table"))
    raw("PATCH", f"{JOBS}/table/status", {"status": {"phase": "Running", "nodes": 2, "restarts": 1,
        "progress": {"step": 5, "loss": 2.5}}}, "application/merge-patch+json")  # fmt: skip
    _, table, _ = raw("GET", f"{JOBS}/table", headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
    cols = [c["name"] for c in table["columnDefinitions"]]
    assert cols == ["Name", "Phase", "Nodes", "Step", "Loss", "Tokens/s", "Restarts", "Reason", "Age", "Message"]
    assert [c["priority"] for c in table["columnDefinitions"]][-1] == 1, "Message shows with -o wide"
    assert table["rows"][0]["cells"][:7] == ["table", "Running", 2, 5, 2.5, None, 1]


def test_pods_are_validated_as_the_api_server_does(raw: Raw) -> None:
    """Issue 27 item 6: a request above its limit, or a bad env name, is refused as a real API
    server refuses the pod (the operator must never render one)."""
    bad = pod("p-limits")
    bad["spec"]["containers"][0]["resources"] = {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}
    code, status, _ = raw("POST", PODS, bad)
    assert code == 422 and "must be less than or equal to memory limit of 1Gi" in status["message"], status
    bad = pod("p-env")
    bad["spec"]["containers"][0]["env"] = [{"name": "1BAD", "value": "x"}]
    code, status, _ = raw("POST", PODS, bad)
    assert code == 422 and "a valid environment variable name" in status["message"], status
