"""The PretrainJob API: typed models, presets, validation and the CRD generated from them."""

from pretrain.api.presets import PRESETS, ModelDims, resolve_dims
from pretrain.api.spec import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    Phase,
    PretrainJob,
    PretrainJobSpec,
    PretrainJobStatus,
)
from pretrain.api.validation import SpecError, load_job, parse_job, parse_spec, total_steps

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "PRESETS",
    "VERSION",
    "ModelDims",
    "Phase",
    "PretrainJob",
    "PretrainJobSpec",
    "PretrainJobStatus",
    "SpecError",
    "load_job",
    "parse_job",
    "parse_spec",
    "resolve_dims",
    "total_steps",
]
