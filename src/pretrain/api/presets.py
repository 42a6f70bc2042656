"""Model size presets and the resolution of a ModelSpec into concrete dimensions.

Pure and torch-free: the validator, the planner and the trainer all call `resolve_dims` so that
one rule decides what "gpt2-124m with 6 layers" means.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pretrain.api.spec import ModelSpec


@dataclass(frozen=True)
class ModelDims:
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    intermediate: int
    max_positions: int
    vocab_size: int | None  # None: taken from the tokenizer at run time


_P = ModelDims
PRESETS: dict[str, ModelDims] = {
    "tiny": _P(layers=2, heads=4, kv_heads=4, hidden=128, intermediate=512, max_positions=512, vocab_size=None),
    "small": _P(layers=6, heads=8, kv_heads=8, hidden=512, intermediate=2048, max_positions=1024, vocab_size=None),
    "gpt2-124m": _P(12, 12, 12, 768, 3072, 1024, 50257),
    "gpt2-350m": _P(24, 16, 16, 1024, 4096, 1024, 50257),
    "llama-1b": _P(16, 32, 8, 2048, 8192, 4096, 128256),
    "llama-7b": _P(32, 32, 32, 4096, 11008, 4096, 32000),
    "bert-base": _P(12, 12, 12, 768, 3072, 512, 30522),
    "bert-large": _P(24, 16, 16, 1024, 4096, 512, 30522),
}

_DIM_FIELDS = ("layers", "heads", "hidden")


class MissingDimension(ValueError):
    """A dimension is neither given nor provided by a preset; `field` names it (camelCase)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


def resolve_dims(model: ModelSpec) -> ModelDims:
    """Merge the preset (if any) with explicit dimensions; explicit values win."""
    if model.preset is not None:
        if model.preset not in PRESETS:
            raise MissingDimension("preset", f"unknown preset {model.preset!r} (known: {', '.join(PRESETS)})")
        base = PRESETS[model.preset]
    else:
        for name in _DIM_FIELDS:
            if getattr(model, name) is None:
                raise MissingDimension(name, "required when model.preset is not set")
        assert model.layers and model.heads and model.hidden
        base = ModelDims(
            layers=model.layers,
            heads=model.heads,
            kv_heads=model.heads,
            hidden=model.hidden,
            intermediate=4 * model.hidden,
            max_positions=1024,
            vocab_size=None,
        )
    heads = model.heads or base.heads
    hidden = model.hidden or base.hidden
    kv_default = heads if model.heads and not model.kv_heads else base.kv_heads
    return replace(
        base,
        layers=model.layers or base.layers,
        heads=heads,
        kv_heads=model.kv_heads or min(kv_default, heads),
        hidden=hidden,
        intermediate=model.intermediate or (4 * hidden if model.hidden else base.intermediate),
        max_positions=model.max_positions or base.max_positions,
        vocab_size=model.vocab_size or base.vocab_size,
    )


def params_estimate(dims: ModelDims, vocab_size: int) -> int:
    """Approximate parameter count (embeddings + blocks), for logs and FLOPs estimates."""
    attn = 2 * dims.hidden * dims.hidden + 2 * dims.hidden * (dims.hidden // dims.heads) * dims.kv_heads
    mlp = 2 * dims.hidden * dims.intermediate
    return dims.layers * (attn + mlp) + vocab_size * dims.hidden
