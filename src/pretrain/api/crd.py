"""The PretrainJob CustomResourceDefinition, generated from the pydantic models.

Pydantic emits JSON Schema with `$ref`s, `anyOf: [X, null]`, numeric `exclusiveMinimum` and
`additionalProperties: false`; the apiserver wants a *structural* OpenAPI v3 schema. `structural`
rewrites one into the other; `crd()` adds what only Kubernetes knows: subresources, printer
columns, and CEL rules for the cross-field checks CEL can express (the Python validator in
`pretrain.api.validation` enforces the same rules, and more, before anything reaches a cluster).
"""

from __future__ import annotations

import copy
from typing import Any

from pretrain.api.spec import (
    GROUP,
    KIND,
    MAX_NAME_LENGTH,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    PretrainJobSpec,
    PretrainJobStatus,
)

_DROP = {"title", "additionalProperties"}

#: CEL rules on `spec` (the same checks as pretrain.api.validation, where CEL can say them).
SPEC_RULES: list[dict[str, str]] = [
    {
        "rule": "self.training.globalBatchSize % (self.training.microBatchSize * self.resources.nodes"
        " * self.resources.procsPerNode) == 0",
        "message": "training.globalBatchSize must be divisible by microBatchSize x nodes x procsPerNode",
        "fieldPath": ".training.globalBatchSize",
    },
    {
        "rule": "has(self.training.maxSteps) || has(self.training.tokenBudget)",
        "message": "training: set maxSteps or tokenBudget",
        "fieldPath": ".training",
    },
    {
        "rule": "!self.training.zero.offloadParams || self.training.zero.stage == 3",
        "message": "training.zero.offloadParams needs zero.stage 3",
        "fieldPath": ".training.zero.offloadParams",
    },
    {
        "rule": "!self.training.zero.offloadOptimizer || self.training.zero.stage > 0",
        "message": "training.zero.offloadOptimizer needs zero.stage 1, 2 or 3",
        "fieldPath": ".training.zero.offloadOptimizer",
    },
    {
        "rule": "!has(self.objective.type) || !(self.objective.type in ['clm', 'mlm'])"
        " || (self.objective.type == 'mlm') == (self.model.family == 'bert')",
        "message": "objective.type: mlm needs family bert, clm needs a causal family (gpt2, llama)",
        "fieldPath": ".objective.type",
    },
    {
        "rule": "!has(self.model.hidden) || !has(self.model.heads) || self.model.hidden % self.model.heads == 0",
        "message": "model.heads must divide model.hidden",
        "fieldPath": ".model.heads",
    },
    {
        "rule": "!has(self.model.maxPositions) || self.data.sequenceLength <= self.model.maxPositions",
        "message": "data.sequenceLength must not exceed model.maxPositions",
        "fieldPath": ".data.sequenceLength",
    },
    {
        "rule": "has(self.model.preset) || (has(self.model.layers) && has(self.model.heads) && has(self.model.hidden))",
        "message": "model: set a preset or layers, heads and hidden",
        "fieldPath": ".model",
    },
    {
        "rule": "self.training.precision != 'fp16' || self.resources.accelerator == 'gpu'",
        "message": "training.precision fp16 needs accelerator gpu",
        "fieldPath": ".training.precision",
    },
]

#: Fields a running job cannot change: the trainer's state would no longer match them.
IMMUTABLE = {
    "model": "model is immutable: create a new job (initFrom can start from this one's export)",
    "objective": "objective is immutable",
    "tokenizer": "tokenizer is immutable",
    "data": "data is immutable: checkpoints hold the loader's position in this corpus",
}
RESOURCES_RULE = {
    "rule": "self.nodes == oldSelf.nodes && self.procsPerNode == oldSelf.procsPerNode",
    "message": "resources.nodes and resources.procsPerNode are immutable (the world size of the checkpoints)",
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".status.nodes"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Tokens/s", "type": "number", "jsonPath": ".status.progress.tokensPerSecond"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a pydantic JSON Schema into a structural Kubernetes OpenAPI v3 schema."""
    defs = schema.get("$defs", {})

    def walk(node: dict[str, Any]) -> dict[str, Any]:
        node = dict(node)
        if "$ref" in node:
            target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
            merged = walk(target)
            merged.update({k: v for k, v in node.items() if k in ("description", "default")})
            node = merged
        if "anyOf" in node:
            options = node.pop("anyOf")
            non_null = [o for o in options if o.get("type") != "null"]
            types = {o.get("type") for o in non_null}
            if types == {"integer", "string"} and len(non_null) == 2:
                node["x-kubernetes-int-or-string"] = True
            elif len(non_null) == 1:
                inner = walk(non_null[0])
                inner.update({k: v for k, v in node.items() if k not in inner or k == "description"})
                node = inner
            else:
                raise ValueError(f"cannot express anyOf {options} structurally")
            if len(non_null) < len(options):
                node["nullable"] = True
            if node.get("default", 0) is None:
                del node["default"]
        if "const" in node:
            node["enum"] = [node.pop("const")]
        for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
                node[flag] = node.pop(bound)
                node[bound] = True
        if node.get("type") == "object" or "properties" in node:
            node["type"] = "object"
            extra = node.get("additionalProperties")
            if "properties" in node:
                props = {}
                for name, sub in node["properties"].items():
                    props[name] = walk(sub)
                    # An all-defaults section gets `default: {}` so the apiserver fills it in
                    # and CEL rules can read its fields without has() guards.
                    if (
                        "properties" in props[name]
                        and not props[name].get("required")
                        and not props[name].get("nullable")
                    ):
                        props[name].setdefault("default", {})
                node["properties"] = props
            elif extra is True or extra == {}:
                node["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(extra, dict):
                node["additionalProperties"] = walk(extra)
                return {k: v for k, v in node.items() if k != "title" and k != "$defs"}
        if "items" in node:
            node["items"] = walk(node["items"])
        return {k: v for k, v in node.items() if k not in _DROP and k != "$defs"}

    return walk(schema)


def spec_schema() -> dict[str, Any]:
    out = structural(PretrainJobSpec.model_json_schema(by_alias=True))
    for field, message in IMMUTABLE.items():
        out["properties"][field]["x-kubernetes-validations"] = [{"rule": "self == oldSelf", "message": message}]
    out["properties"]["resources"]["x-kubernetes-validations"] = [RESOURCES_RULE]
    out["x-kubernetes-validations"] = copy.deepcopy(SPEC_RULES)
    return out


def status_schema() -> dict[str, Any]:
    return structural(PretrainJobStatus.model_json_schema(by_alias=True))


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    schema = {
        "type": "object",
        "description": "A pre-training (or fine-tuning) run of a transformer language model.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (pod names derive from it)",
            }
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["all", "pretrain"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crd_yaml() -> str:
    import yaml

    header = "# Generated by `pretrain crd` from pretrain.api; do not edit (tests/test_crd.py checks it).\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)
