"""Pydantic models of the PretrainJob resource: the single source of truth.

Every other part of pretrain (the CRD schema, the operator's planner, the trainer, the local
launcher) reads a job through these models and nothing re-parses YAML. Field names are
snake_case in Python and camelCase on the wire, as Kubernetes APIs are. Each field documents
itself where it is declared; those descriptions flow into the CRD and the API reference.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from pretrain import objectives

GROUP = "pretrain.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "PretrainJob"
PLURAL = "pretrainjobs"
SINGULAR = "pretrainjob"
SHORT_NAMES = ["ptj"]

#: Longest job name: pods are named ``<job>-a<attempt>-n<rank>`` and must stay DNS labels.
MAX_NAME_LENGTH = 45

DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

#: Every integer field has an upper bound (int32 unless a field says less): a value such as
#: `seed: 1e23` or `evalSteps: 1e9` must fail validation, not crash or exhaust memory later.
INT32_MAX = 2**31 - 1
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
#: Floats are finite everywhere (Spec sets allow_inf_nan=False); this one is positive.
PositiveFloat = Annotated[float, Field(gt=0)]
Quantity = Annotated[str, Field(pattern=QUANTITY, max_length=64)]


class Spec(BaseModel):
    """Base of every section: camelCase on the wire, unknown fields rejected, values checked on
    assignment so that ``--set`` overrides go through the same rules as the file."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        use_enum_values=True,
        allow_inf_nan=False,  # .inf and .nan are refused in every float field
    )


LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _check_label_key(key: str) -> None:
    """A Kubernetes qualified name: an optional DNS-subdomain prefix and `/`, then a name of at
    most 63 characters."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN_RE.match(prefix)):
        raise ValueError(f"key {key[:80]!r}: the prefix must be a DNS subdomain of at most 253 characters")
    if len(name) > 63 or not LABEL_NAME.match(name):
        raise ValueError(f"key {key[:80]!r}: the name must be at most 63 characters of [A-Za-z0-9_.-], "
                         "beginning and ending with an alphanumeric")  # fmt: skip


# --------------------------------------------------------------------------- model


class ModelSpec(Spec):
    """The network: a transformers family, sized by a preset and/or explicit dimensions."""

    family: Literal["gpt2", "llama", "bert"] = Field(
        "gpt2", description="Architecture family: gpt2 and llama are causal, bert is bidirectional."
    )
    preset: str | None = Field(
        None,
        description="Size preset (see pretrain.api.presets): tiny, small, gpt2-124m, gpt2-350m, "
        "llama-1b, llama-7b, bert-base, bert-large. Explicit dimensions override it.",
    )
    layers: PositiveInt | None = Field(None, le=1024, description="Number of transformer blocks.")
    heads: PositiveInt | None = Field(None, le=1024, description="Attention heads per block.")
    kv_heads: PositiveInt | None = Field(
        None, le=1024, description="Key/value heads (grouped-query attention; llama only)."
    )
    hidden: PositiveInt | None = Field(None, le=131_072, description="Hidden (model) dimension.")
    intermediate: PositiveInt | None = Field(None, le=524_288, description="Feed-forward inner dimension.")
    vocab_size: PositiveInt | None = Field(
        None, le=2_097_152, description="Vocabulary size; defaults to the tokenizer's (rounded up to a multiple of 64)."
    )
    max_positions: PositiveInt | None = Field(None, le=1_048_576, description="Longest sequence the model accepts.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability (0 for pre-training).")
    init_from: str | None = Field(
        None,
        max_length=2048,
        description="Start from weights in a Hugging Face model directory or object-storage URI "
        "(for instance the final/ export of an earlier job) instead of random initialisation.",
    )
    attention: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention implementation passed to transformers."
    )


if TYPE_CHECKING:
    ObjectiveType = str
else:
    #: Every objective, one module of pretrain.tasks each (pretrain.objectives reads their file
    #: names, importing none): a Literal, so the CRD's enum and the errors list them.
    ObjectiveType = Literal[objectives.names()]


class ObjectiveSpec(Spec):
    """What the model learns to predict: language modelling (pre-training) or a labelled task
    (fine-tuning an exported model, named by model.initFrom)."""

    type: ObjectiveType | None = Field(
        None,
        description="clm (next token) or mlm (masked tokens), by default mlm for bert and clm otherwise; or a "
        "fine-tuning task: sequence-classification, token-classification (e.g. BIO tags), extractive-qa (SQuAD).",
    )
    mask_probability: float = Field(0.15, gt=0.0, lt=1.0, description="Share of tokens selected for masking (mlm).")
    label_field: str = Field(
        "label", min_length=1, max_length=256, description="Column of the class (sequence-classification)."
    )
    label_names: list[str] = Field(
        default_factory=list, max_length=10000,
        description="Class or tag names in id order; default: the sorted distinct labels of the training data.",
    )  # fmt: skip
    tokens_field: str = Field(
        "tokens", min_length=1, max_length=256, description="Column of the words (token-classification)."
    )
    tags_field: str = Field(
        "tags", min_length=1, max_length=256, description="Column of the per-word tags (token-classification)."
    )
    question_field: str = Field(
        "question", min_length=1, max_length=256, description="Column of the question (extractive-qa)."
    )
    context_field: str = Field(
        "context", min_length=1, max_length=256, description="Column of the context (extractive-qa)."
    )
    answers_field: str = Field(
        "answers", min_length=1, max_length=256,
        description="Column of the answers, as in SQuAD: {text: [...], answer_start: [...]} (extractive-qa).",
    )  # fmt: skip
    max_answer_tokens: PositiveInt = Field(30, le=65_536, description="Longest answer span predicted (extractive-qa).")

    @property
    def fine_tuning(self) -> bool:
        """Trained on labelled rows (a fine-tuning task) rather than packed text."""
        return objectives.is_fine_tuning(self.type)


class TokenizerSpec(Spec):
    """How text becomes token ids."""

    type: Literal["bytes", "chars", "bpe", "pretrained"] = Field(
        "bytes",
        description="bytes: 256 byte tokens; chars: one token per character seen in the data; "
        "bpe: train a byte-level BPE tokenizer on the data; pretrained: load from path.",
    )
    vocab_size: PositiveInt = Field(8192, le=1_000_000, description="Vocabulary size of a trained bpe tokenizer.")
    path: str | None = Field(None, max_length=2048, description="Tokenizer directory or URI (type pretrained).")
    sample_bytes: PositiveInt = Field(
        100_000_000, le=INT32_MAX, description="How much of the corpus a bpe or chars tokenizer is trained on."
    )


# --------------------------------------------------------------------------- data


class DataSourceSpec(Spec):
    """One corpus: a local path, glob or URI (file://, s3://, gs://, hf://, builtin://)."""

    uri: str = Field(..., min_length=1, max_length=2048, description="Path, glob or URI of the corpus.")
    weight: PositiveFloat = Field(1.0, le=1e6, description="Relative sampling weight among sources.")
    format: Literal["auto", "text", "jsonl", "csv", "parquet"] = Field(
        "auto", description="File format; auto picks by extension (.jsonl/.json, .csv, .parquet, else text)."
    )
    text_field: str = Field("text", min_length=1, max_length=256, description="Column holding the text.")


class ResourceList(Spec):
    """CPU and memory of one pod (Kubernetes quantities)."""

    cpu: Quantity | None = Field(None, description="CPU quantity, e.g. 8 or 500m.")
    memory: Quantity | None = Field(None, description="Memory quantity, e.g. 64Gi.")


class DataPrepareSpec(Spec):
    """The preparation stage: `workers` pods, each tokenizing and packing its share of the units of
    work (files, and 64 MiB ranges of large files) into data.cacheUri; the last to finish commits."""

    workers: int = Field(..., ge=1, le=10_000, description="Pods of the stage (the Indexed Job's completions).")
    parallelism: int | None = Field(None, ge=1, le=10_000, description="Pods at once; default: workers.")
    backoff_limit_per_index: int = Field(3, ge=0, le=100, description="Retries of one worker before the job fails.")
    requests: ResourceList = Field(default_factory=lambda: ResourceList(cpu="1", memory="2Gi"),
                                   description="Per-pod requests.")  # fmt: skip
    limits: ResourceList = Field(default_factory=ResourceList, description="Per-pod limits.")


class DataStageSpec(Spec):
    """One stage of the data mixture: the sources' weights until a number of tokens trained on."""

    until_tokens: PositiveInt | None = Field(
        None,
        le=2**62,
        description="Tokens (the whole job's, from the run's start) at which the next stage begins; "
        "the last stage lasts to the end whatever it says.",
    )
    weights: list[float] = Field(..., min_length=1, max_length=64,
                                 description="One weight per source (in sources' order), 0 to leave one out.")  # fmt: skip


class DataSpec(Spec):
    """The corpus and how it is cut into training sequences."""

    sources: list[DataSourceSpec] = Field(..., min_length=1, max_length=64, description="Corpora to train on.")
    sequence_length: PositiveInt = Field(1024, le=1_048_576, description="Tokens per training sequence (packed).")
    validation_split: float = Field(0.01, ge=0.0, lt=1.0, description="Share of sequences held out for evaluation.")
    validation_sources: list[DataSourceSpec] = Field(
        default_factory=list,
        max_length=64,
        description="Held-out corpora; when set, validationSplit is ignored.",
    )
    shuffle_seed: NonNegativeInt = Field(1234, le=INT32_MAX, description="Seed of the sequence order (below 2^31).")
    stages: list[DataStageSpec] = Field(
        default_factory=list, max_length=32,
        description="Mixtures that change at token boundaries (a late anneal on high-quality data); unset: the "
        "sources' weights throughout. Deterministic by position, so they survive resume and resize.",
    )  # fmt: skip
    cache_uri: str | None = Field(
        None,
        max_length=2048,
        description="Where prepared shards go, shared by every node and later jobs (object storage); unset: each "
        "node's rank 0 prepares its own copy.",
    )
    prepare: DataPrepareSpec | None = Field(
        None,
        description="Prepare the data first in a parallel stage on the cluster (an Indexed Job owned by this job, "
        "writing to cacheUri), then train; unset: rank 0 prepares while the other ranks wait.",
    )
    stream_cache: Quantity = Field(
        "4Gi",
        description="With cacheUri, ranks stream the prepared shards from there (no node downloads the corpus) "
        "through a node-local cache of verified blocks this large, shared out among the node's ranks.",
    )


# --------------------------------------------------------------------------- training


class OptimizerSpec(Spec):
    """AdamW; weight decay is never applied to biases and norms."""

    lr: PositiveFloat = Field(3e-4, le=10.0, description="Peak learning rate.")
    betas: list[float] = Field(
        default_factory=lambda: [0.9, 0.95], min_length=2, max_length=2, description="Adam beta1, beta2."
    )
    eps: PositiveFloat = Field(1e-8, le=1.0, description="Adam epsilon.")
    weight_decay: float = Field(0.1, ge=0.0, le=10.0, description="Decoupled weight decay.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class ScheduleSpec(Spec):
    """Linear warm-up then decay to minLr; or warm-up, stable, decay (wsd)."""

    warmup_steps: NonNegativeInt = Field(0, le=INT32_MAX, description="Steps of linear warm-up from 0.")
    decay: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine", description="Shape of the decay. wsd: warm-up, the peak lr held (stable), then a decay over the "
        "last decaySteps (or decayFraction of the steps) shaped by decayShape; a decay can be branched from any "
        "stable-phase checkpoint (docs/operations.md).",
    )  # fmt: skip
    min_lr: float = Field(0.0, ge=0.0, le=10.0, description="Learning rate at the last step.")
    decay_steps: PositiveInt | None = Field(
        None, le=INT32_MAX, description="wsd: steps of the final decay (default: decayFraction of the steps)."
    )
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="wsd: the decay's share of the steps.")
    decay_shape: Literal["linear", "cosine", "sqrt"] = Field(
        "linear", description="wsd: the decay's shape (sqrt: 1 - sqrt(progress), MiniCPM's and DeepSeek's)."
    )


class SelectiveRecomputeSpec(Spec):
    """Recompute in the backward only part of the activations: every k-th layer, or only the
    attention of those layers (less memory saved than full recomputation, less time lost)."""

    every: PositiveInt = Field(
        2, le=1000, description="Recompute layers 0, every, 2 x every, ... (1: every layer, as gradientCheckpointing)."
    )
    part: Literal["layer", "attention"] = Field(
        "layer", description="What of each chosen layer is recomputed: all of it, or its attention block only."
    )


class ZeroSpec(Spec):
    """DeepSpeed ZeRO partitioning."""

    stage: int = Field(1, ge=0, le=3, description="0: plain data parallel; 1: optimizer; 2: +grads; 3: +params.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (stage 1-3).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (stage 3 only).")


class GuardSpec(Spec):
    """The loss guard: a non-finite loss or gradient norm, or a loss spike (its z-score over the
    recent steps' losses), found where the losses are read back anyway (no host sync per step)."""

    action: Literal["rollback", "skip", "fail", "warn"] = Field(
        "rollback",
        description="rollback: reload the last checkpoint and skip the data trained on since (through the bad "
        "step); skip: leave the bad step's update out (decided on the device before the optimizer steps; not "
        "with zero.offloadOptimizer); fail: end the job with one line; warn: log, count and go on.",
    )
    spike_z_score: float = Field(
        0.0, ge=0.0, le=1000.0, description="A loss this many standard deviations above the recent mean is a spike "
        "(0: spikes are not checked; non-finite values always are).",
    )  # fmt: skip
    window_steps: int = Field(200, ge=10, le=100_000, description="Recent steps whose losses the z-score is over.")
    min_history_steps: int = Field(50, ge=2, le=100_000, description="Steps seen before spikes are checked.")
    max_rollbacks: NonNegativeInt = Field(
        3, le=1000, description="Rollbacks (skipped steps, with action skip) allowed within rollbackPeriodSteps; "
        "one more fails the job.",
    )  # fmt: skip
    rollback_period_steps: PositiveInt = Field(1000, le=INT32_MAX, description="The period maxRollbacks counts over.")


class TrainingSpec(Spec):
    """The recipe: how long, how big a batch, which optimizer and schedule."""

    max_steps: PositiveInt | None = Field(None, le=INT32_MAX, description="Optimizer steps to run.")
    token_budget: int | None = Field(
        None, ge=1, le=2**53, description="Tokens to train on; maxSteps is derived when maxSteps is unset."
    )
    global_batch_size: PositiveInt = Field(
        8, le=16_777_216, description="Sequences per optimizer step, all ranks together."
    )
    micro_batch_size: PositiveInt = Field(
        1, le=65_536, description="Sequences per forward pass on one rank; accumulation is derived."
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Optimizer settings.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Learning-rate schedule.")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Training precision.")
    zero: ZeroSpec = Field(default_factory=ZeroSpec, description="ZeRO settings.")
    grad_clip: float = Field(1.0, ge=0.0, le=1e6, description="Clip the gradient norm to this (0 turns it off).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    selective_recompute: SelectiveRecomputeSpec | None = Field(
        None, description="Recompute only some layers, or only their attention (instead of gradientCheckpointing)."
    )
    compile: bool | None = Field(
        None,
        description="torch.compile the model (DeepSpeed's engine.compile). Unset: on with GPUs, off on CPU, where "
        "the first step's compile (about 30 s here) outweighs the gain of short runs.",
    )
    seed: NonNegativeInt = Field(
        1234, le=INT32_MAX, description="Seed of initialisation, masking and dropout (below 2^31)."
    )
    eval_interval: NonNegativeInt = Field(0, le=INT32_MAX, description="Evaluate every N steps (0: only at the end).")
    eval_steps: PositiveInt = Field(10, le=100_000, description="Micro batches per evaluation and rank.")
    log_interval: PositiveInt = Field(10, le=INT32_MAX, description="Log every N steps.")
    guard: GuardSpec = Field(default_factory=GuardSpec, description="What a non-finite loss or a loss "
                             "spike does.")  # fmt: skip


# --------------------------------------------------------------------------- checkpoint


class CheckpointSpec(Spec):
    """Where and how often state is saved, and what a restarted job resumes from."""

    uri: str | None = Field(
        None,
        max_length=2048,
        description="Directory or URI (file://, s3://, gs://); local runs default to ./runs/<name>/checkpoints.",
    )
    interval_steps: PositiveInt = Field(1000, le=INT32_MAX, description="Save every N steps (and at the end).")
    keep_last: PositiveInt = Field(3, le=10_000, description="Complete checkpoints to keep.")
    keep_every: PositiveInt | None = Field(
        None, le=INT32_MAX, description="Also keep every checkpoint whose step is a multiple."
    )
    resume: int | str = Field(
        "auto",
        description="auto: newest verified checkpoint; never: start fresh; a number: that step.",
    )
    fail_on_error: bool = Field(False, description="Stop training when a checkpoint cannot be saved.")
    credentials_secret: str | None = Field(
        None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Secret whose keys become environment variables (AWS_ACCESS_KEY_ID, ...).",
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict,
        description="fsspec storage options (for example endpoint_url); never credentials.",
    )

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_policy(cls, v: Any) -> int | str:
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= INT32_MAX:
            return v
        if isinstance(v, str) and v in ("auto", "never"):
            return v
        if isinstance(v, str) and v.isdigit() and len(v) <= 10 and int(v) <= INT32_MAX:
            return int(v)
        raise ValueError(f"must be auto, never or a step number, not {str(v)[:40]!r}")


# --------------------------------------------------------------------------- resources


class EnvVar(Spec):
    """An extra environment variable of the trainer container."""

    name: str = Field(..., pattern=ENV_NAME, max_length=256, description="Variable name.")
    value: str = Field("", max_length=32768, description="Literal value (use credentialsSecret for secrets).")


class ElasticSpec(Spec):
    """Run on fewer nodes when some cannot be had, and grow back when they return."""

    min_nodes: PositiveInt = Field(..., le=4096, description="The fewest nodes the job trains on.")
    max_nodes: PositiveInt | None = Field(
        None, le=4096, description="The most nodes it grows to (default: resources.nodes, where it starts)."
    )
    shrink_after_seconds: int = Field(
        120, ge=0, le=86400,
        description="How long a pod of the gang may wait unscheduled before the job restarts on the nodes it "
        "has (down to minNodes), from its newest checkpoint.",
    )  # fmt: skip


class TopologySpec(Spec):
    """Where Kueue places the gang (its podset-required-topology or podset-preferred-topology)."""

    level: str = Field(
        ..., min_length=1, max_length=316, pattern=r"^([a-z0-9.-]+/)?[A-Za-z0-9][-A-Za-z0-9_.]*$",
        description="The node label of the topology level, e.g. cloud.provider.com/topology-rack.",
    )  # fmt: skip
    mode: Literal["required", "preferred"] = Field(
        "required", description="required: all pods in one domain of that level or none placed; preferred: as few "
        "domains as fit.",
    )  # fmt: skip


class ResourcesSpec(Spec):
    """The pods: how many, how big, where they may run."""

    nodes: PositiveInt = Field(1, le=4096, description="Pods (torchrun agents), one per node.")
    procs_per_node: PositiveInt = Field(1, le=64, description="Trainer processes per pod (GPUs per pod).")
    accelerator: Literal["gpu", "cpu"] = Field(
        "gpu", description="gpu requests procsPerNode GPUs per pod and uses NCCL; cpu uses gloo."
    )
    gpu_resource: str = Field("nvidia.com/gpu", max_length=253, description="Extended resource name of a GPU.")
    image: str = Field(
        "ghcr.io/pretrain-io/pretrain-trainer:0.1.0",
        min_length=1,
        max_length=1024,
        description="Trainer image.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Image pull policy."
    )
    requests: ResourceList = Field(default_factory=ResourceList, description="Per-pod requests.")
    limits: ResourceList = Field(default_factory=ResourceList, description="Per-pod limits.")
    shm_size: Quantity = Field("8Gi", description="Size of /dev/shm (memory-backed emptyDir).")
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=64, description="Pod nodeSelector.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity.")
    priority_class_name: str | None = Field(None, max_length=253, description="Pod priorityClassName.")
    scheduler_name: str | None = Field(
        None, max_length=253, description="Pod schedulerName. volcano: each attempt gets a Volcano PodGroup "
        "(scheduling.volcano.sh/v1beta1, minMember = its nodes) that its pods name, so Volcano places the gang whole.",
    )  # fmt: skip
    service_account_name: str | None = Field(None, max_length=253, description="Pod serviceAccountName.")
    queue_name: str | None = Field(
        None, max_length=63, description="Kueue LocalQueue (the kueue.x-k8s.io/queue-name label); with schedulerName "
        "volcano, the Volcano Queue of the attempt's PodGroup instead.",
    )  # fmt: skip
    topology: TopologySpec | None = Field(
        None, description="Kueue Topology Aware Scheduling: the gang's pods placed within one domain of a node "
        "label (a rack, a block); needs queueName.",
    )  # fmt: skip
    labels: dict[str, str] = Field(default_factory=dict, max_length=64, description="Extra pod labels.")
    annotations: dict[str, str] = Field(default_factory=dict, max_length=64, description="Extra pod annotations.")
    env: list[EnvVar] = Field(default_factory=list, max_length=256, description="Extra environment.")
    elastic: ElasticSpec | None = Field(
        None, description="Shrink to minNodes when nodes are lost, grow back when capacity returns."
    )
    termination_grace_period_seconds: int | None = Field(
        None, ge=1, le=86400,
        description="Pod terminationGracePeriodSeconds: on SIGTERM (preemption, eviction, a resize) the trainer "
        "saves a checkpoint before this runs out. Default: sized from the model (see docs/operations.md).",
    )  # fmt: skip

    @field_validator("labels", "node_selector")
    @classmethod
    def _label_rules(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            _check_label_key(key)
            if len(value) > 63 or not LABEL_VALUE.match(value):
                raise ValueError(f"label value for {key!r} must be at most 63 characters of [A-Za-z0-9_.-], "
                                 "beginning and ending with an alphanumeric")  # fmt: skip
        return v

    @field_validator("annotations")
    @classmethod
    def _annotation_rules(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            _check_label_key(key)
        if sum(len(k) + len(val) for k, val in v.items()) > 256 * 1024:
            raise ValueError("annotations must total at most 256 KiB (the API server's limit)")
        return v


FailureAction = Literal["FailJob", "RestartJob", "RestartJobIgnore"]

#: Why a pod stopped without the trainer failing: evictions, preemption, a lost or drained node.
#: The operator's reason for a pod whose node turned NotReady (or showed a bad condition).
NODE_NOT_READY = "NodeNotReady"
#: The default failure policy restarts the gang for these without counting against maxRestarts.
DISRUPTION_REASONS = (
    "DisruptionTarget",  # pod condition set before an eviction, preemption or taint-based deletion
    "TerminationTarget",  # Kueue's condition on pods of a preempted plain-pod group
    "PreemptionByScheduler",
    "EvictionByEvictionAPI",
    "DeletionByTaintManager",
    "DeletionByPodGC",
    "TerminationByKubelet",
    "Evicted",
    "Preempted",
    "NodeLost",
    NODE_NOT_READY,
    "NodeShutdown",
    "Shutdown",
)


class ExitCodeSelector(Spec):
    """Exit codes of the trainer container (Kubernetes podFailurePolicy's onExitCodes)."""

    operator: Literal["In", "NotIn"] = Field("In", description="In: the exit code is one of values; NotIn: it is not.")
    values: list[Annotated[int, Field(ge=0, le=255)]] = Field(
        ..., min_length=1, max_length=255, description="Exit codes, 0 to 255 (0 only with NotIn)."
    )


class FailurePolicyRule(Spec):
    """One rule: a pod failure that matches every selector given gets `action`."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.onExitCodes) || has(self.onReasons)",
                    "message": "a rule needs onExitCodes or onReasons",
                },
                {
                    "rule": "!has(self.onExitCodes) || self.onExitCodes.operator != 'In' || !(0 in self.onExitCodes.values)",
                    "message": "onExitCodes: 0 is not a failure (use it only with NotIn)",
                },
            ]
        }
    )

    name: str | None = Field(None, max_length=63, description="Shown in the job's condition when the rule decides.")
    action: FailureAction = Field(
        ...,
        description="FailJob: fail at once; RestartJob: restart the gang, counting against maxRestarts; "
        "RestartJobIgnore: restart without counting.",
    )
    on_exit_codes: ExitCodeSelector | None = Field(None, description="Match the trainer's exit code.")
    on_reasons: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="Match any of these: the pod's status reason (Evicted, NodeLost), a True pod condition type "
        "(DisruptionTarget) or its reason (PreemptionByScheduler), or the container's terminated reason (OOMKilled, Error).",
    )

    @model_validator(mode="after")
    def _selects_something(self) -> FailurePolicyRule:
        if self.on_exit_codes is None and self.on_reasons is None:
            raise ValueError("a rule needs onExitCodes or onReasons")
        if self.on_exit_codes is not None and self.on_exit_codes.operator == "In" and 0 in self.on_exit_codes.values:
            raise ValueError("onExitCodes: 0 is not a failure (use it only with NotIn)")
        return self


class FailurePolicySpec(Spec):
    """Which pod failures fail the job, restart it, or restart it without counting (JobSet's failurePolicy).

    Rules are tried in order on the pod that failed first; the first that matches decides. When
    none does, the defaults apply: a disruption (eviction, preemption, node loss: any of
    DISRUPTION_REASONS) restarts without counting, anything else (an OOMKilled container, an exit
    code, a pod that vanished without a trace) restarts and counts against maxRestarts."""

    rules: list[FailurePolicyRule] = Field(default_factory=list, max_length=32, description="Rules, first match wins.")


#: A node condition's type: a name, or a DNS-prefixed one (example.com/GPUHealthy); never Ready.
NodeConditionType = Annotated[
    str, Field(min_length=1, max_length=316, pattern=r"^([a-z0-9.-]+/)?[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
]


class RunPolicySpec(Spec):
    """What happens on failure, over time, and at the end."""

    max_restarts: NonNegativeInt = Field(3, le=1000, description="Gang restarts before the job fails.")
    restart_backoff_seconds: NonNegativeInt = Field(10, le=86_400, description="First wait before a restart (doubles).")
    max_restart_backoff_seconds: NonNegativeInt = Field(300, le=604_800, description="Cap of the restart wait.")
    active_deadline_seconds: PositiveInt | None = Field(
        None, le=INT32_MAX, description="Fail the job after it has run this long (time suspended does not count)."
    )
    failure_policy: FailurePolicySpec = Field(
        default_factory=FailurePolicySpec, description="What a pod failure does (rules, then defaults)."
    )
    ttl_seconds_after_finished: NonNegativeInt | None = Field(
        None, le=INT32_MAX, description="Delete the job (its children go with it) this long after it ends."
    )
    suspend: bool = Field(False, description="Delete pods and hold the job; resumes when unset.")
    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        "Running", description="Pods deleted when the job ends: All, Running (still running ones) or None."
    )
    scheduling_timeout_seconds: PositiveInt = Field(
        600, le=INT32_MAX, description="Pending pods older than this raise the Unschedulable condition."
    )
    failed_node_avoidance_seconds: NonNegativeInt = Field(
        3600, le=INT32_MAX,
        description="After a gang failure that may be the node's (an exit code or signal, a stall, a lost node), "
        "the next attempts prefer other nodes than the one the first failed pod ran on, for this long (a "
        "preferred node anti-affinity: with no other node free, the gang still lands there); 0: off.",
    )  # fmt: skip
    stall_timeout_seconds: int | None = Field(
        None, ge=30, le=INT32_MAX,
        description="A rank with no step (or evaluation batch, or checkpoint phase) finished this long dumps its "
        "threads' stacks and exits, and the operator restarts a gang whose node 0 went this long without one "
        "(reason Stalled). Unset: 20x the longest step seen, at least 15 minutes (1 hour until the second step).",
    )  # fmt: skip
    bad_node_conditions: list[NodeConditionType] = Field(
        default_factory=list, max_length=16,
        description="Node condition types that, True on a node of the running gang, end the attempt at once as a "
        "NotReady node does (node-problem-detector's KernelDeadlock or ReadonlyFilesystem, a GPU health "
        "condition). A node whose Ready condition turns False or Unknown always ends it (reason NodeNotReady).",
    )  # fmt: skip
    scheduling_timeout_action: Literal["Wait", "FailJob", "Suspend"] = Field(
        "Wait",
        description="When the gang stays unschedulable past schedulingTimeoutSeconds: Wait (the condition only), "
        "FailJob, or Suspend (the operator sets runPolicy.suspend; unset it to try again).",
    )

    @field_validator("bad_node_conditions")
    @classmethod
    def _not_ready_itself(cls, v: list[str]) -> list[str]:
        if "Ready" in v:
            raise ValueError("Ready is True on a healthy node (a NotReady node always ends the attempt)")
        return v


class MlflowSpec(Spec):
    """Track the run in MLflow: rank 0 mirrors the run's history into one MLflow run over the
    tracking server's REST API (the mlflow package is not needed). Credentials come only from
    spec.checkpoint.credentialsSecret: MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD."""

    tracking_uri: str = Field(
        ..., min_length=1, max_length=2048, description="The tracking server, http(s)://host[:port][/path]."
    )
    experiment: str = Field("pretrain", min_length=1, max_length=500, description="The experiment (made when missing).")
    run_name: str | None = Field(
        None, min_length=1, max_length=250, description="The MLflow run's name (default: the job's name)."
    )


class MonitoringSpec(Spec):
    """Prometheus metrics of the trainer, and the run's history files."""

    metrics_port: int = Field(9464, ge=1024, le=65535, description="Port of the /metrics endpoint on every rank.")
    pod_monitor: bool = Field(False, description="Create a Prometheus Operator PodMonitor.")
    tensorboard: bool = Field(
        False,
        description="Also write TensorBoard event files to <checkpoint.uri>/tensorboard (metrics.jsonl is always written).",
    )
    peak_flops: PositiveFloat | None = Field(
        None, le=1e21, description="Peak FLOP/s of one device for MFU; default from a table of GPUs."
    )
    mlflow: MlflowSpec | None = Field(
        None, description="Track the run in MLflow (params, the history's metrics, the final evaluation and export)."
    )


class PretrainJobSpec(Spec):
    """Desired state of a PretrainJob."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="The network.")
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec, description="The training objective.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="The tokenizer.")
    data: DataSpec = Field(..., description="The corpus.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="The recipe.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoints and resume.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Pods and placement.")
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec, description="Restarts, deadline, clean-up.")
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec, description="Metrics.")

    @property
    def world_size(self) -> int:
        return self.resources.nodes * self.resources.procs_per_node

    @property
    def objective_type(self) -> str:
        if self.objective.type is not None:
            return self.objective.type
        return "mlm" if self.model.family == "bert" else "clm"


# --------------------------------------------------------------------------- status


class Phase(StrEnum):
    PENDING = "Pending"
    PREPARING = "Preparing"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class Condition(Spec):
    """A Kubernetes-style condition (type, status, reason, message, lastTransitionTime)."""

    type: str = Field(..., max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field("", max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: str | None = None
    observed_generation: int | None = None


class StorageRetrying(Spec):
    """A storage call node 0 has been retrying (its checkpoints or data do not answer)."""

    since: str | None = None
    operation: str | None = None
    error: str | None = None
    attempt: int | None = Field(None, description="The attempt whose trainer reported it.")


class Heartbeat(Spec):
    """Node 0's last progress (a step, an evaluation, a checkpoint) and its stall limit."""

    time: str | None = None
    limit_seconds: int | None = Field(None, description="Seconds without progress that mean a stall.")
    attempt: int | None = Field(None, description="The attempt whose trainer reported it.")


class GuardProgress(Spec):
    """What node 0's loss guard found in one attempt (training.guard)."""

    events: int | None = Field(None, description="Bad steps found (non-finite or spike).")
    last_step: int | None = None
    attempt: int | None = Field(None, description="The attempt whose trainer reported it.")


class Progress(Spec):
    """Node 0's latest numbers, scraped by the operator (every 60 seconds by default)."""

    step: int | None = Field(None, description="Last optimizer step reported by rank 0.")
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = Field(None, description="Model FLOPs utilisation of node 0's first device (0-1), when its "
                              "peak FLOP/s is known.")  # fmt: skip
    percent: float | None = None
    eta_seconds: float | None = None
    updated_time: str | None = None
    source_tokens: dict[str, int] | None = Field(
        None, description="Tokens trained on from each data source (by URI) since the run began."
    )
    storage_retrying: StorageRetrying | None = Field(
        None, description="Set while node 0 retries a call to its storage; the job's reason is then StorageUnavailable."
    )
    guard: GuardProgress | None = Field(None, description="Set once node 0's loss guard found a bad step.")
    time: dict[str, float] | None = Field(
        None, description="Where node 0's trainer spent this attempt (restart, training, recomputed, checkpoint, "
        "evaluation seconds; stepSeconds; attempt).",
    )  # fmt: skip
    heartbeat: Heartbeat | None = Field(
        None, description="Node 0's last progress: older than its limit (plus 3 minutes), the gang restarts (Stalled)."
    )


class CheckpointRef(Spec):
    """The newest verified checkpoint."""

    step: int | None = None
    uri: str | None = None
    time: str | None = None


class Resize(Spec):
    """An elastic job's last change of size: a planned restart, not counted against maxRestarts."""

    from_nodes: int | None = None
    to_nodes: int | None = None
    reason: str | None = Field(None, description="Shrink (nodes could not be placed) or Grow (capacity returned).")
    message: str | None = None
    time: str | None = None
    count: int | None = Field(None, description="Resizes so far.")


class PreparationStatus(Spec):
    """The data preparation stage (data.prepare), as its Indexed Job reports it."""

    workers: int | None = None
    completed: int | None = Field(None, description="Workers done.")
    failed_indexes: str | None = Field(None, description='Workers over their retry limit ("0-2,4").')
    done: bool | None = Field(None, description="Every part written and committed: training may start.")
    units: int | None = Field(None, description="Units of work (files, 64 MiB ranges) of the workers done.")
    documents: int | None = Field(None, description="Documents tokenized by the workers done.")
    tokens: int | None = Field(None, description="Tokens packed by the workers done (training and validation).")
    reused_from: str | None = Field(
        None, description="The job whose preparation stage prepared this data (this job ran none)."
    )
    key: str | None = Field(None, description="Names the data as the operator sees it (sources, tokenizer, cache).")


class AvoidedNode(Spec):
    """A node the next attempts prefer not to use: the first failed pod of a gang failure ran there."""

    node: str
    until: str | None = Field(None, description="When the node is no longer avoided.")
    reason: str | None = Field(None, description="The failure there.")


class Goodput(Spec):
    """Where the job's wall time went (closed totals: updated when a phase or an attempt ends)."""

    seconds: dict[str, float] | None = Field(
        None, description="queued, preparing, restarting, suspended, restart, training, recomputed, checkpoint, "
        "evaluation, other; their total, and ratio = training / total.",
    )  # fmt: skip
    phase_seconds: dict[str, float] | None = Field(None, description="Time by phase, of the phases left.")
    phase_since: str | None = Field(None, description="When the job entered its current phase.")
    trainer_seconds: dict[str, float] | None = Field(None, description="The ended attempts' trainers' own time.")
    attempts_ended: int | None = None


class PretrainJobStatus(Spec):
    """Observed state of a PretrainJob, written only by the operator."""

    phase: Phase | None = None
    reason: str | None = Field(None, description="Why the job is in its phase (CamelCase, as in conditions).")
    message: str | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    attempt: int | None = None
    restarts: int | None = Field(None, description="Gang restarts counted against runPolicy.maxRestarts.")
    uncounted_restarts: int | None = Field(
        None, description="Gang restarts after disruptions (or RestartJobIgnore rules), not counted."
    )
    nodes: int | None = Field(None, description="Nodes of the current attempt (an elastic job's size changes).")
    resize: Resize | None = Field(None, description="The last resize of an elastic job.")
    suspended_seconds: int | None = Field(
        None, description="Time spent suspended, which activeDeadlineSeconds does not count."
    )
    progress: Progress | None = None
    goodput: Goodput | None = Field(None, description="Where the job's wall time went, and the training ratio.")
    guard_events_reported: GuardProgress | None = Field(
        None, description="The loss-guard findings already told in an event (operator bookkeeping)."
    )
    avoided_nodes: list[AvoidedNode] | None = Field(
        None, description="Nodes the next attempts avoid (runPolicy.failedNodeAvoidanceSeconds)."
    )
    preparation: PreparationStatus | None = None
    evaluation: dict[str, float] | None = Field(
        None, description="Latest task metrics (accuracy, macro_f1, f1, exact_match...) of a fine-tuning job."
    )
    last_checkpoint: CheckpointRef | None = None
    start_time: str | None = None
    completion_time: str | None = None
    observed_generation: int | None = None


class ObjectMeta(BaseModel):
    """The part of metadata pretrain reads; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(..., min_length=1, max_length=MAX_NAME_LENGTH, pattern=DNS_LABEL)
    namespace: str | None = Field(None, max_length=63, pattern=DNS_LABEL)

    @field_validator("name")
    @classmethod
    def _name_is_label(cls, v: str) -> str:
        if not re.match(DNS_LABEL, v):
            raise ValueError("must be a DNS-1035 label: lower-case letters, digits and '-', starting with a letter")
        return v


class PretrainJob(Spec):
    """A whole PretrainJob document, as in a YAML file or the Kubernetes API."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_assignment=True)

    api_version: Literal["pretrain.io/v1alpha1"] = Field("pretrain.io/v1alpha1", alias="apiVersion")
    kind: Literal["PretrainJob"] = "PretrainJob"
    metadata: ObjectMeta
    spec: PretrainJobSpec
    status: PretrainJobStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name
