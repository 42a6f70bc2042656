"""Loading a job from YAML, `--set` overrides, and the cross-field rules.

Every failure is a `SpecError` whose `str()` is one line: ``<field path>: <reason>``. The CLI
prints it; the operator writes it into the Invalid condition. Field paths are camelCase, as the
user wrote them in YAML.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from pretrain.api.presets import MissingDimension, resolve_dims
from pretrain.api.quantity import quantity
from pretrain.api.spec import PretrainJob, PretrainJobSpec
from pretrain.contract import POD_ENV
from pretrain.errors import UserError
from pretrain.storage.paths import system_path

#: Token ids a built-in byte tokenizer uses: 256 bytes and 4 special tokens.
BYTE_VOCAB_SIZE = 260

#: Schemes the data layer reads besides fsspec's own.
DATA_SCHEMES = {"", "file", "builtin", "hf", "s3", "gs", "gcs", "az", "abfs", "http", "https", "memory"}
CHECKPOINT_SCHEMES = {"", "file", "s3", "gs", "gcs", "az", "abfs", "memory"}

#: Environment variables the launcher and the operator set; a user value would break rendezvous.
RESERVED_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", *POD_ENV}

_CREDENTIAL_WORDS = re.compile(
    r"secret|password|passwd|token|credential|access_?key|api_?key|^key$|account_?key|connection_?string"
    r"|(^|_)sas($|_)|private_?key|signature|auth",
    re.I,
)


class SpecError(UserError, ValueError):
    """An invalid job: `path` is the camelCase field path, `reason` says what is wrong."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# --------------------------------------------------------------------------- loading


#: Largest job file read: a real one is a few KiB; anything near this is a mistake or an attack.
MAX_JOB_BYTES = 1 << 20


class StrictLoader(yaml.SafeLoader):
    """YAML as a job file needs it: no aliases (`*name`), whose expansion can turn a few lines
    into gigabytes, and no key given twice in one mapping (the last one silently won)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event: Any = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not accepted in a job file; write the value out",
                event.start_mark)  # fmt: skip
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar",
                                                        key_node.start_mark)  # fmt: skip
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_document(text: str, source: str = "<input>") -> dict[str, Any]:
    """Parse one YAML (or JSON) document that must be a mapping."""
    if len(text) > MAX_JOB_BYTES:
        raise SpecError("document", f"{source} is larger than {MAX_JOB_BYTES} bytes: not a job file")
    try:
        docs = [d for d in yaml.load_all(text, Loader=StrictLoader) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "document"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(where, f"not valid YAML: {problem}") from None
    except RecursionError:
        raise SpecError("document", "not valid YAML: nested too deeply") from None
    if not docs:
        raise SpecError("document", f"{source} is empty: expected a PretrainJob mapping")
    if len(docs) > 1:
        raise SpecError("document", f"{source} holds {len(docs)} documents: expected one PretrainJob")
    doc = docs[0]
    if not isinstance(doc, dict):
        raise SpecError("document", f"expected a mapping (apiVersion, kind, metadata, spec), got {_kind(doc)}")
    return doc


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


_TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec", "status"}


def apply_overrides(doc: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``path.to.field=value`` overrides (values parsed as YAML scalars) to a document.

    Paths are camelCase as in the YAML; a path that does not start at a top-level key is taken
    relative to ``spec``. List items are addressed by index (``data.sources.0.uri``).
    """
    for item in overrides:
        if "=" not in item:
            raise SpecError("--set", f"expected path=value, got {item!r}")
        path, raw = item.split("=", 1)
        parts = [p for p in re.split(r"[.\[\]]", path.strip()) if p]  # a.0.b or a[0].b, as helm --set
        if not parts:
            raise SpecError("--set", f"empty field path in {item!r}")
        if parts[0] not in _TOP_LEVEL:
            parts = ["spec", *parts]
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node: Any = doc
        for i, key in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = _list_item(node, key, where)
            elif isinstance(node, dict):
                node = node.setdefault(key, {})
            else:
                raise SpecError(where, f"is a {_kind(node)[2:] if _kind(node).startswith('a ') else _kind(node)}, "
                                       "cannot set a field inside it")  # fmt: skip
        last = parts[-1]
        if isinstance(node, list):
            idx = _index(last, ".".join(parts))
            if idx >= len(node):
                raise SpecError(".".join(parts), f"index {idx} is past the end of a list of {len(node)}")
            node[idx] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise SpecError(".".join(parts[:-1]), "is not a mapping, cannot set a field inside it")
    return doc


def _index(key: str, where: str) -> int:
    if not key.isdigit():
        raise SpecError(where, f"is a list: address an item by number, not {key!r}")
    return int(key)


def _list_item(node: list[Any], key: str, where: str) -> Any:
    idx = _index(key, where)
    if idx >= len(node):
        raise SpecError(where, f"index {idx} is past the end of a list of {len(node)}")
    return node[idx]


def load_job(
    source: str | Path,
    overrides: Iterable[str] = (),
    *,
    check_backends: bool = True,
) -> PretrainJob:
    """Read, override and fully validate a job file."""
    return parse_job(load_document(source, overrides), check_backends=check_backends)


def load_document(source: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """A job file's document with the overrides applied (bounded read; not validated yet)."""
    path = Path(source)
    try:
        with open(path, "rb") as f:  # bounded: a device or a huge file is not read whole
            raw = f.read(MAX_JOB_BYTES + 1)
        if len(raw) > MAX_JOB_BYTES:
            raise SpecError(str(path), f"larger than {MAX_JOB_BYTES} bytes: not a job file")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(str(path), f"cannot read: {e.__class__.__name__}") from None
    return apply_overrides(read_document(text, str(path)), overrides)


def parse_job(doc: dict[str, Any], *, check_backends: bool = True) -> PretrainJob:
    """Validate a document (types, then cross-field rules); raise the first problem."""
    try:
        job = PretrainJob.model_validate(doc)
    except ValidationError as e:
        raise _first_error(e, doc) from None
    for err in check_spec(job.spec, check_backends=check_backends):
        raise err
    return job


def parse_spec(spec: dict[str, Any], *, check_backends: bool = False) -> PretrainJobSpec:
    """Validate a bare spec (as the operator receives it)."""
    try:
        parsed = PretrainJobSpec.model_validate(spec)
    except ValidationError as e:
        raise _first_error(e, spec, prefix="spec") from None
    for err in check_spec(parsed, check_backends=check_backends):
        raise err
    return parsed


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in {"int", "str", "float", "bool"} or part.startswith(("function-", "literal")):
            continue  # union/validator tags, not field names
        else:
            out += ("." if out else "") + part
    return out or "document"


def _first_error(e: ValidationError, doc: dict[str, Any], prefix: str = "") -> SpecError:
    errors = e.errors(include_url=False)
    # Prefer an error on a field the user wrote over a "missing" one higher up.
    err = errors[0]
    loc = tuple(err["loc"])
    path = _format_loc(loc)
    if err["type"] == "extra_forbidden":  # the last part is the unknown name itself, whatever it looks like
        path = f"{_format_loc(loc[:-1])}.{loc[-1]}" if len(loc) > 1 else str(loc[-1])
    if prefix:
        path = f"{prefix}.{path}" if path != "document" else prefix
    kind = err["type"]
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        if _CREDENTIAL_WORDS.search(name):
            reason = ("credentials are never accepted inline; put them in a Secret and name it in "
                      "spec.checkpoint.credentialsSecret")  # fmt: skip
        else:
            reason = "unknown field"
    elif kind == "missing":
        reason = "required field is missing"
    else:
        reason = err["msg"].splitlines()[0].removeprefix("Value error, ")
        if kind != "value_error" and "input" in err and not isinstance(err["input"], dict | list):
            reason += f" (got {_echo(path, err['input'])})"
    more = len(errors) - 1
    if more:
        reason += f" (and {more} more problem{'s' if more > 1 else ''})"
    return SpecError(path, reason)


def _echo(path: str, value: Any) -> str:
    """A rejected value as the error shows it: never one that may be a secret (a field or an
    environment variable named like a credential, a URI with a password), never more than 80
    characters of it."""
    text = repr(value)
    if _CREDENTIAL_WORDS.search(path) or "@" in text or ".env[" in path or "storageOptions" in path:
        return "a value, not shown"
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


# --------------------------------------------------------------------------- cross-field rules


def check_spec(spec: PretrainJobSpec, *, check_backends: bool = True) -> Iterator[SpecError]:
    """Yield every cross-field problem of a type-valid spec, most fundamental first."""
    yield from _check_model(spec)
    yield from _check_training(spec)
    yield from _check_data(spec, check_backends)
    yield from _check_checkpoint(spec, check_backends)
    yield from _check_resources(spec)
    if spec.monitoring.mlflow is not None:
        yield from _check_uri("spec.monitoring.mlflow.trackingUri", spec.monitoring.mlflow.tracking_uri,
                              {"http", "https"}, False)  # fmt: skip


#: Why a job without checkpoint.uri loses its work on a cluster (shared by validate and the operator).
NO_CHECKPOINT_URI = (
    "spec.checkpoint.uri is not set: on a cluster the checkpoints stay in the pod's emptyDir, and a restarted, "
    "resized or resumed job starts again from step 0 (`pretrain run` keeps them in its run folder)"
)


def spec_warnings(spec: PretrainJobSpec) -> list[str]:
    """What is valid but loses work: said by `pretrain validate` and as the operator's event.
    Not refused: a one-node job without shared storage is a fair quick experiment, and the
    smallest example is one; refusing would also need a webhook (CEL rules cannot warn)."""
    return [NO_CHECKPOINT_URI] if not spec.checkpoint.uri else []


def _check_model(spec: PretrainJobSpec) -> Iterator[SpecError]:
    m = spec.model
    try:
        dims = resolve_dims(m)
    except MissingDimension as e:
        yield SpecError(f"spec.model.{e.field}", str(e))
        return
    if dims.hidden % dims.heads:
        yield SpecError("spec.model.heads", f"{dims.heads} heads do not divide hidden size {dims.hidden}")
    if m.kv_heads is not None and m.family != "llama":
        yield SpecError("spec.model.kvHeads", f"grouped-query attention is llama-only, not {m.family}")
    if dims.heads % dims.kv_heads:
        yield SpecError("spec.model.kvHeads", f"{dims.kv_heads} kv heads do not divide {dims.heads} heads")
    if spec.data.sequence_length > dims.max_positions:
        yield SpecError(
            "spec.data.sequenceLength",
            f"{spec.data.sequence_length} is above model.maxPositions ({dims.max_positions})",
        )
    if m.attention == "flash_attention_2" and spec.resources.accelerator == "cpu":
        yield SpecError("spec.model.attention", "flash_attention_2 needs accelerator gpu")
    objective = spec.objective_type
    if len(set(spec.objective.label_names)) != len(spec.objective.label_names):
        yield SpecError("spec.objective.labelNames", "names must be distinct")
    if objective == "mlm" and m.family != "bert":
        yield SpecError("spec.objective.type", f"mlm needs a bidirectional family (bert), not causal {m.family}")
    if objective == "clm" and m.family == "bert":
        yield SpecError("spec.objective.type", "clm needs a causal family (gpt2, llama), not bert")
    tok = spec.tokenizer
    if tok.type == "pretrained" and not tok.path:
        yield SpecError("spec.tokenizer.path", "required when tokenizer.type is pretrained")
    if tok.type != "pretrained" and tok.path:
        yield SpecError("spec.tokenizer.path", f"only used with type pretrained, not {tok.type}")
    known_vocab = BYTE_VOCAB_SIZE if tok.type == "bytes" else tok.vocab_size if tok.type == "bpe" else None
    if m.vocab_size is not None and known_vocab is not None and m.vocab_size < known_vocab:
        yield SpecError("spec.model.vocabSize", f"{m.vocab_size} is below the tokenizer's vocabulary ({known_vocab})")
    if m.init_from is not None:
        yield from _check_uri("spec.model.initFrom", m.init_from, CHECKPOINT_SCHEMES | {"hf"}, False)


def _check_training(spec: PretrainJobSpec) -> Iterator[SpecError]:
    t = spec.training
    world = spec.world_size
    if t.max_steps is None and t.token_budget is None:
        yield SpecError("spec.training.maxSteps", "set maxSteps or tokenBudget")
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        yield SpecError(
            "spec.training.globalBatchSize",
            f"{t.global_batch_size} is not divisible by microBatchSize x world size "
            f"({t.micro_batch_size} x {world} = {per_step})",
        )
    tokens_per_step = t.global_batch_size * spec.data.sequence_length
    if t.max_steps is None and t.token_budget is not None and t.token_budget < tokens_per_step:
        yield SpecError(
            "spec.training.tokenBudget",
            f"{t.token_budget} is less than one step ({tokens_per_step} tokens)",
        )
    if t.schedule.min_lr > t.optimizer.lr:
        yield SpecError("spec.training.schedule.minLr", f"{t.schedule.min_lr} is above optimizer.lr ({t.optimizer.lr})")
    yield from _check_wsd(spec)
    if t.selective_recompute is not None and t.gradient_checkpointing:
        yield SpecError("spec.training.selectiveRecompute", "set it or gradientCheckpointing (every layer), not both")
    if t.guard.action == "skip" and t.zero.offload_optimizer:
        yield SpecError("spec.training.guard.action", "skip needs the trainer's AdamW; zero.offloadOptimizer "
                        "steps DeepSpeed's CPU Adam, which cannot leave a step out")  # fmt: skip
    if t.zero.offload_params and t.zero.stage != 3:
        yield SpecError("spec.training.zero.offloadParams", f"needs zero.stage 3, not {t.zero.stage}")
    if t.zero.offload_optimizer and t.zero.stage == 0:
        yield SpecError("spec.training.zero.offloadOptimizer", "needs zero.stage 1, 2 or 3")
    if t.precision == "fp16" and spec.resources.accelerator == "cpu":
        yield SpecError("spec.training.precision", "fp16 needs accelerator gpu; use bf16 or fp32 on cpu")


def _check_wsd(spec: PretrainJobSpec) -> Iterator[SpecError]:
    """decaySteps only with wsd, and room for it after the warm-up."""
    sched, steps = spec.training.schedule, total_steps(spec)
    if sched.decay_steps is None:
        return
    if sched.decay != "wsd":
        yield SpecError("spec.training.schedule.decaySteps", f"only with decay wsd, not {sched.decay}")
    elif steps is not None and sched.decay_steps > steps - sched.warmup_steps:
        yield SpecError("spec.training.schedule.decaySteps", f"{sched.decay_steps} is more than the {steps} steps "
                        f"leave after warmupSteps ({sched.warmup_steps})")  # fmt: skip


def total_steps(spec: PretrainJobSpec) -> int | None:
    """Optimizer steps of the run: maxSteps, else the token budget over tokens per step."""
    t = spec.training
    if t.max_steps is not None:
        return t.max_steps
    if t.token_budget is not None:
        return max(1, t.token_budget // (t.global_batch_size * spec.data.sequence_length))
    return None


def _check_data(spec: PretrainJobSpec, check_backends: bool) -> Iterator[SpecError]:
    for field, sources in (
        ("sources", spec.data.sources),
        ("validationSources", spec.data.validation_sources),
    ):
        for i, src in enumerate(sources):
            yield from _check_uri(f"spec.data.{field}[{i}].uri", src.uri, DATA_SCHEMES, check_backends)
            if _scheme(src.uri) in ("", "file"):
                where = system_path(src.uri.removeprefix("file://"))
                if where is not None:
                    yield SpecError(f"spec.data.{field}[{i}].uri",
                                    f"lies in {where}, the machine's own files; a data source reads a corpus")  # fmt: skip
    if spec.data.cache_uri:
        yield from _check_uri("spec.data.cacheUri", spec.data.cache_uri, CHECKPOINT_SCHEMES, check_backends)
    yield from _check_stages(spec)
    prep = spec.data.prepare
    if prep is not None and (spec.data.cache_uri is None or _scheme(spec.data.cache_uri) in {"", "file", "memory"}):
        yield SpecError("spec.data.prepare", "needs spec.data.cacheUri in object storage (s3://, gs://, ...): "
                        "the workers' pods write their parts there, and the trainer's pods read the dataset from it")  # fmt: skip
    if prep is not None and spec.objective.fine_tuning:
        yield SpecError("spec.data.prepare", f"packs text for pre-training; {spec.objective.type} reads labelled rows, "
                        "which need no preparation stage")  # fmt: skip
    if prep is not None and prep.parallelism is not None and prep.parallelism > prep.workers:
        yield SpecError("spec.data.prepare.parallelism", f"{prep.parallelism} is more than workers ({prep.workers})")


def _check_stages(spec: PretrainJobSpec) -> Iterator[SpecError]:
    """Stages, and the sources they weigh: each corpus once (its URI names it in the token counts)."""
    seen: dict[str, int] = {}
    for i, src in enumerate(spec.data.sources):
        if src.uri in seen:
            yield SpecError(f"spec.data.sources[{i}].uri", f"the same as sources[{seen[src.uri]}]: name each corpus "
                            "once (its weight says how much of it)")  # fmt: skip
        seen.setdefault(src.uri, i)
    stages, n = spec.data.stages, len(spec.data.sources)
    last = 0
    for i, stage in enumerate(stages):
        where = f"spec.data.stages[{i}]"
        if len(stage.weights) != n:
            yield SpecError(f"{where}.weights", f"{len(stage.weights)} weight(s) for {n} source(s)")
        elif any(not math.isfinite(w) or w < 0 for w in stage.weights) or not any(w > 0 for w in stage.weights):
            yield SpecError(f"{where}.weights", "must be finite, not negative, and not all 0")
        if stage.until_tokens is None and i != len(stages) - 1:
            yield SpecError(f"{where}.untilTokens", "required on every stage but the last")
        elif stage.until_tokens is not None and stage.until_tokens <= last:
            yield SpecError(f"{where}.untilTokens", f"{stage.until_tokens} is not after the previous stage's {last}")
        last = stage.until_tokens or last


def _check_checkpoint(spec: PretrainJobSpec, check_backends: bool) -> Iterator[SpecError]:
    c = spec.checkpoint
    if c.uri is not None:
        yield from _check_uri("spec.checkpoint.uri", c.uri, CHECKPOINT_SCHEMES, check_backends)
    yield from _inline_secrets("spec.checkpoint.storageOptions", c.storage_options)
    if spec.resources.nodes > 1 and c.uri is None:
        yield SpecError(
            "spec.checkpoint.uri",
            f"required with {spec.resources.nodes} nodes: they share checkpoints through object storage (s3://, gs://, ...)",
        )
    if spec.resources.nodes > 1 and c.uri is not None and _scheme(c.uri) in {"", "file", "memory"}:
        yield SpecError(
            "spec.checkpoint.uri",
            f"{spec.resources.nodes} nodes need shared storage (s3://, gs://, ...), not a local path",
        )


def _check_resources(spec: PretrainJobSpec) -> Iterator[SpecError]:
    r = spec.resources
    for i, var in enumerate(r.env):
        if var.name in RESERVED_ENV:
            yield SpecError(f"spec.resources.env[{i}].name", f"{var.name} is set by the launcher")
        if _CREDENTIAL_WORDS.search(var.name):
            yield SpecError(
                f"spec.resources.env[{i}].name",
                "credentials are never accepted inline; use spec.checkpoint.credentialsSecret",
            )
    for kind in ("cpu", "memory"):
        want, cap = getattr(r.requests, kind), getattr(r.limits, kind)
        if want is not None and cap is not None and quantity(want) > quantity(cap):
            # The API server refuses such a pod; the job would sit with ApplyFailed.
            yield SpecError(f"spec.resources.requests.{kind}", f"{want} is above limits.{kind} ({cap})")
    yield from _check_elastic(spec)
    if r.topology is not None and r.scheduler_name == "volcano":
        yield SpecError("spec.resources.topology", "Kueue's topology placement; Volcano places a PodGroup by its own "
                        "networkTopology, which this field does not set")  # fmt: skip
    elif r.topology is not None and not r.queue_name:
        yield SpecError("spec.resources.topology", "Kueue places by topology only the workloads it admits: set "
                        "spec.resources.queueName")  # fmt: skip
    rp = spec.run_policy
    if rp.restart_backoff_seconds > rp.max_restart_backoff_seconds:
        yield SpecError(
            "spec.runPolicy.restartBackoffSeconds",
            f"{rp.restart_backoff_seconds} is above maxRestartBackoffSeconds ({rp.max_restart_backoff_seconds})",
        )


def _check_elastic(spec: PretrainJobSpec) -> Iterator[SpecError]:
    r = spec.resources
    e = r.elastic
    if e is None:
        return
    top = e.max_nodes or r.nodes
    if e.min_nodes > r.nodes:
        yield SpecError("spec.resources.elastic.minNodes", f"{e.min_nodes} is above resources.nodes ({r.nodes})")
    if top < r.nodes:
        yield SpecError("spec.resources.elastic.maxNodes", f"{top} is below resources.nodes ({r.nodes})")
    t = spec.training
    for field, n in (("minNodes", e.min_nodes), ("maxNodes", top)):
        per_step = t.micro_batch_size * n * r.procs_per_node
        if t.global_batch_size % per_step:
            yield SpecError(
                f"spec.resources.elastic.{field}",
                f"training.globalBatchSize {t.global_batch_size} is not divisible by microBatchSize x {n} nodes x "
                f"procsPerNode ({per_step}): the job could not train at that size",
            )


def _inline_secrets(path: str, options: Any) -> Iterator[SpecError]:
    """Credentials written into storage options, at any depth (client_kwargs, config_kwargs...):
    a key named like one, or a URL value carrying a user or password (endpoint_url)."""
    if isinstance(options, dict):
        for key, value in options.items():
            where = f"{path}.{key}"
            if _CREDENTIAL_WORDS.search(str(key)):
                yield SpecError(where, "credentials are never accepted inline; put them in a Secret and name it in "
                                       "spec.checkpoint.credentialsSecret")  # fmt: skip
            else:
                yield from _inline_secrets(where, value)
    elif isinstance(options, list):
        for i, value in enumerate(options):
            yield from _inline_secrets(f"{path}[{i}]", value)
    elif isinstance(options, str) and "://" in options:
        try:
            parts = urlsplit(options)
            has_user = bool(parts.username or parts.password)
        except ValueError:
            has_user = "@" in options
        if has_user:
            yield SpecError(
                path, "credentials are never accepted inline in a URL; use spec.checkpoint.credentialsSecret"
            )


def _scheme(uri: str) -> str:
    if re.match(r"^[A-Za-z]:[\\/]", uri):  # a Windows drive letter is not a scheme
        return ""
    return urlsplit(uri).scheme.lower() if "://" in uri else ""


def _check_uri(path: str, uri: str, allowed: set[str], check_backends: bool) -> Iterator[SpecError]:
    scheme = _scheme(uri)
    parts = urlsplit(uri) if scheme else None
    if parts is not None and (parts.password or parts.username):
        yield SpecError(path, "credentials are never accepted inline in a URI; use spec.checkpoint.credentialsSecret")
        return
    if scheme not in allowed:
        yield SpecError(
            path,
            f"unsupported scheme {scheme!r}:// (supported: {', '.join(sorted(s for s in allowed if s))})",
        )
        return
    if scheme in {"s3", "gs", "gcs", "az", "abfs"} and parts is not None and not parts.netloc:
        yield SpecError(path, f"{uri!r} names no bucket")
        return
    if check_backends and scheme not in {"", "file", "builtin", "memory", "http", "https"}:
        reason = _backend_missing(scheme)
        if reason:
            yield SpecError(path, reason)


def _backend_missing(scheme: str) -> str | None:
    """Why no installed fsspec backend serves `scheme`, or None when one does."""
    try:
        import fsspec
    except ImportError:
        return "object storage needs fsspec: pip install 'pretrain[trainer]'"
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        return f"no installed fsspec backend handles {scheme}:// ({str(e).splitlines()[0]})"
    except ValueError:
        return f"no fsspec backend is known for {scheme}://"
    return None
