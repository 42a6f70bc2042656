"""The PATCH bodies clients send: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and, for
built-in kinds only, strategic merge patch (lists merged by their patchMergeKey, as kubectl's
client-side apply computes them)."""

from __future__ import annotations

import copy
from typing import Any

from tests.kubeapi.store_errors import bad_request

MERGE = "application/merge-patch+json"
JSON = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"  # server-side apply
APPLY = "application/apply-patch+yaml"

#: patchMergeKey of the built-in lists a strategic merge patch merges instead of replacing.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
    "volumes": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath", "imagePullSecrets": "name",
    "conditions": "type", "ownerReferences": "uid", "hostAliases": "ip", "topologySpreadConstraints": "topologyKey",
}  # fmt: skip
#: Lists of scalars merged as sets (strategy "merge").
MERGE_SETS = {"finalizers"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null deletes, anything else replaces. Kept apart from
    the operator's own (operator/cluster.py) on purpose: a stand-in that imported the code under
    test would agree with its bugs (tests/operator/test_cluster_contract.py checks the two agree)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_patch(target: Any, ops: Any) -> Any:
    import jsonpatch

    if not isinstance(ops, list):
        raise bad_request("json patch must be a list of operations")
    try:
        return jsonpatch.apply_patch(target, ops)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
        from tests.kubeapi.store import ApiError

        raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {e}") from None


def strategic_merge_patch(target: Any, patch: Any, key: str | None = None) -> Any:
    """Strategic merge patch for the lists kubectl and the kubelet patch on built-in objects."""
    if isinstance(patch, list):
        mkey = MERGE_KEYS.get(key or "")
        if mkey and isinstance(target, list):
            out = copy.deepcopy(target)
            for item in patch:
                if not isinstance(item, dict):
                    continue
                idx = next(
                    (i for i, t in enumerate(out) if isinstance(t, dict) and t.get(mkey) == item.get(mkey)), None
                )
                if item.get("$patch") == "delete":
                    if idx is not None:
                        out.pop(idx)
                elif idx is None:
                    out.append({k: v for k, v in item.items() if not k.startswith("$")})
                else:
                    out[idx] = strategic_merge_patch(out[idx], item)
            return out
        if key in MERGE_SETS and isinstance(target, list):
            return list(dict.fromkeys([*target, *patch]))
        return copy.deepcopy(patch)
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: v for k, v in patch.items() if k != "$patch"}
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if k.startswith("$setElementOrder/") or k in ("$retainKeys", "$patch"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            name = k.split("/", 1)[1]
            out[name] = [x for x in out.get(name, []) if x not in v]
            continue
        if v is None:
            out.pop(k, None)
        else:
            out[k] = strategic_merge_patch(out.get(k), v, k)
    return out
