"""A CRD's structural openAPIV3Schema applied as the API server applies it to a custom resource:
prune unknown fields (or report them, for fieldValidation=Strict), fill defaults, validate types and
value constraints, then evaluate the `x-kubernetes-validations` CEL rules (transition rules with
`oldSelf` only on update, only where the old object had the field).

Error strings follow the API server's field.Error format, for instance
`spec.training.microBatchSize: Invalid value: 0: spec.training.microBatchSize in body should be
greater than or equal to 1`, so a test (or a user of kubectl) reads what a cluster would print.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


@dataclass(frozen=True)
class FieldError:
    field: str
    reason: str  # FieldValueInvalid, FieldValueRequired, FieldValueNotSupported, FieldValueTypeInvalid
    detail: str

    def __str__(self) -> str:
        return f"{self.field}: {self.detail}"


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    """How the API server quotes an invalid value in a message."""
    if isinstance(value, dict | list):
        return '"object"' if isinstance(value, dict) else '"array"'
    return json.dumps(value)


def prune(obj: Any, schema: dict[str, Any], path: str = "", root: bool = True) -> list[str]:
    """Drop fields the schema does not declare, in place; return their paths."""
    dropped: list[str] = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            props = schema.get("properties") or {}
            for k, sub in props.items():
                if k in obj:
                    dropped += prune(obj[k], sub, _join(path, k), False)
            return dropped
        if "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
            for k in list(obj):
                dropped += prune(obj[k], schema["additionalProperties"], _join(path, k), False)
            return dropped
        props = schema.get("properties") or {}
        for k in list(obj):
            if root and k in ("apiVersion", "kind", "metadata"):
                continue
            if k not in props:
                dropped.append(_join(path, k))
                del obj[k]
            else:
                dropped += prune(obj[k], props[k], _join(path, k), False)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            dropped += prune(item, schema["items"], _join(path, i), False)
    return dropped


def default(obj: Any, schema: dict[str, Any]) -> None:
    """Fill declared defaults in place, outside-in (a defaulted object is defaulted inside too)."""
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        for k, sub in props.items():
            if k not in obj and "default" in sub:
                obj[k] = copy.deepcopy(sub["default"])
            if k in obj and obj[k] is not None:
                default(obj[k], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for v in obj.values():
                default(v, extra)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            default(item, schema["items"])


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    t = schema.get("type")
    if t is None:
        return True
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[t])


def validate(obj: Any, schema: dict[str, Any], path: str = "") -> list[FieldError]:
    """Type and value checks of the OpenAPI v3 subset structural schemas allow."""
    errors: list[FieldError] = []
    if obj is None:
        if not schema.get("nullable"):
            errors.append(FieldError(path, "FieldValueTypeInvalid",
                                     f'Invalid value: "null": {path} in body must be of type {schema.get("type")}: "null"'))  # fmt: skip
        return errors
    if not _type_ok(obj, schema):
        got = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}.get(
            type(obj), type(obj).__name__
        )
        expected = "integer or string" if schema.get("x-kubernetes-int-or-string") else schema.get("type")
        errors.append(FieldError(path, "FieldValueTypeInvalid",
                                 f'Invalid value: "{got}": {path} in body must be of type {expected}: "{got}"'))  # fmt: skip
        return errors
    if "enum" in schema and obj not in schema["enum"]:
        allowed = ", ".join(json.dumps(v) for v in schema["enum"])
        errors.append(
            FieldError(path, "FieldValueNotSupported", f"Unsupported value: {_show(obj)}: supported values: {allowed}")
        )
    if isinstance(obj, int | float) and not isinstance(obj, bool):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if lo is not None and (obj <= lo if schema.get("exclusiveMinimum") else obj < lo):
            word = "greater than" if schema.get("exclusiveMinimum") else "greater than or equal to"
            errors.append(
                FieldError(
                    path, "FieldValueInvalid", f"Invalid value: {_show(obj)}: {path} in body should be {word} {lo}"
                )
            )
        if hi is not None and (obj >= hi if schema.get("exclusiveMaximum") else obj > hi):
            word = "less than" if schema.get("exclusiveMaximum") else "less than or equal to"
            errors.append(
                FieldError(
                    path, "FieldValueInvalid", f"Invalid value: {_show(obj)}: {path} in body should be {word} {hi}"
                )
            )
    if isinstance(obj, str):
        if "maxLength" in schema and len(obj) > schema["maxLength"]:
            errors.append(FieldError(path, "FieldValueTooLong",
                                     f"Too long: may not be more than {schema['maxLength']} bytes"))  # fmt: skip
        if "minLength" in schema and len(obj) < schema["minLength"]:
            errors.append(FieldError(path, "FieldValueInvalid",
                                     f"Invalid value: {_show(obj)}: {path} in body should be at least {schema['minLength']} chars long"))  # fmt: skip
        if "pattern" in schema and not re.search(schema["pattern"], obj):
            errors.append(FieldError(path, "FieldValueInvalid",
                                     f"Invalid value: {_show(obj)}: {path} in body should match '{schema['pattern']}'"))  # fmt: skip
    if isinstance(obj, list):
        if "maxItems" in schema and len(obj) > schema["maxItems"]:
            errors.append(
                FieldError(
                    path, "FieldValueTooMany", f"Too many: {len(obj)}: must have at most {schema['maxItems']} items"
                )
            )
        if "minItems" in schema and len(obj) < schema["minItems"]:
            errors.append(FieldError(path, "FieldValueInvalid",
                                     f"Invalid value: {len(obj)}: {path} in body should have at least {schema['minItems']} items"))  # fmt: skip
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(obj):
                errors += validate(item, schema["items"], _join(path, i))
    if isinstance(obj, dict):
        for req in schema.get("required") or []:
            if req not in obj:
                errors.append(FieldError(_join(path, req), "FieldValueRequired", "Required value"))
        props = schema.get("properties") or {}
        for k, v in obj.items():
            if k in props and not (path == "" and k == "metadata"):
                errors += validate(v, props[k], _join(path, k))
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate(v, schema["additionalProperties"], _join(path, k))
    return errors


_MISSING = object()


def cel_rules(new: Any, old: Any, schema: dict[str, Any], path: str = "") -> list[FieldError]:
    """Evaluate every x-kubernetes-validations rule at its node (self = the value there)."""
    import cel

    errors: list[FieldError] = []
    if new is None:
        return errors
    for rule in schema.get("x-kubernetes-validations") or []:
        expr = rule["rule"]
        transition = "oldSelf" in expr
        if transition and old is _MISSING:
            continue  # transition rules run on update only, where the old value exists
        ctx = {"self": _cel_view(new, path)}
        if transition:
            ctx["oldSelf"] = _cel_view(old, path)
        field = path + rule.get("fieldPath", "") if rule.get("fieldPath") else path
        try:
            ok = cel.evaluate(expr, ctx)
        except Exception as e:  # an evaluation error is reported, as the API server does
            errors.append(FieldError(field, "FieldValueInvalid", f"Invalid value: {_show(new)}: {e}"))
            continue
        if ok is not True:
            message = rule.get("message") or f"failed rule: {expr}"
            errors.append(FieldError(field, "FieldValueInvalid", f"Invalid value: {_show(new)}: {message}"))
    if isinstance(new, dict):
        props = schema.get("properties") or {}
        for k, sub in props.items():
            if k in new and not (path == "" and k == "metadata"):
                prev = old.get(k, _MISSING) if isinstance(old, dict) else _MISSING
                errors += cel_rules(new[k], prev, sub, _join(path, k))
    elif isinstance(new, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(new):
            errors += cel_rules(item, _MISSING, schema["items"], _join(path, i))
    return errors


def _cel_view(value: Any, path: str) -> Any:
    """At the root, CEL sees only metadata.name and metadata.generateName (as the API server)."""
    if path == "" and isinstance(value, dict) and "metadata" in value:
        meta = value["metadata"] or {}
        value = {**value, "metadata": {k: meta[k] for k in ("name", "generateName") if k in meta}}
    return _drop_nulls(value)


def _drop_nulls(value: Any) -> Any:
    """A null field is an absent field to CEL's has() in the API server (nullable fields)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def admit(
    new: dict[str, Any], old: dict[str, Any] | None, schema: dict[str, Any], strict: bool
) -> tuple[list[FieldError], list[str]]:
    """Prune, default, validate and run the CEL rules on a custom resource (in place).

    Returns (errors, warnings); with `strict`, unknown fields are errors instead of warnings."""
    unknown = prune(new, schema)
    problems: list[FieldError] = []
    warnings: list[str] = []
    for f in unknown:
        if strict:
            problems.append(FieldError(f, "FieldValueInvalid", f'unknown field "{f}"'))
        else:
            warnings.append(f'unknown field "{f}"')
    if problems:
        return problems, warnings
    default(new, schema)
    problems = validate(new, schema)
    if problems:
        return problems, warnings
    return cel_rules(new, old if old is not None else _MISSING, schema), warnings
