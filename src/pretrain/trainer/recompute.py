"""Activation recomputation: every layer (`training.gradientCheckpointing`), or a selection
(`training.selectiveRecompute`: every k-th layer, or only the attention of those layers).

Full recomputation keeps one tensor per layer and runs every layer's forward twice; recomputing
every k-th layer keeps the activations of the others, and recomputing only attention (which holds
the scores and the softmax, the largest activations at long sequences) spares its matmuls'
inputs from being stored while the MLP's are kept. Whole layers are recomputed by transformers
itself (`activation_checkpointing_enable(every_n_layers=k)`); attention alone, which it does not
offer, by wrapping the chosen layers' attention blocks' forward in torch's checkpoint here.
"""

from __future__ import annotations

from typing import Any

from pretrain.api.spec import TrainingSpec

#: The recompute is not re-entrant: it works with inputs that need no grad, keyword arguments
#: and DeepSpeed's hooks, and is what transformers and torch recommend.
CHECKPOINT_KWARGS = {"use_reentrant": False}


def layers_of(model: Any) -> list[Any]:
    """The model's transformer layers, first to last."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def attention_of(layer: Any) -> Any:
    """A layer's attention block: its first child whose class says Attention."""
    found = next((m for m in layer.children() if "Attention" in type(m).__name__), None)
    if found is None:
        raise ValueError(f"{type(layer).__name__} has no attention block to recompute")
    return found


def apply_recompute(model: Any, training: TrainingSpec) -> list[int]:
    """Turn recomputation on as the spec says; returns the indexes of the layers recomputed."""
    layers = layers_of(model)
    selective = training.selective_recompute
    if training.gradient_checkpointing:
        model.activation_checkpointing_enable(CHECKPOINT_KWARGS)
        return list(range(len(layers)))
    if selective is None:
        return []
    chosen = [i for i in range(len(layers)) if i % selective.every == 0]
    if selective.part == "layer":  # transformers' own selection: layer_index % every_n_layers == 0
        model.activation_checkpointing_enable(CHECKPOINT_KWARGS, every_n_layers=selective.every)
    else:
        for i in chosen:
            _checkpoint_forward(attention_of(layers[i]))
    return chosen


def _checkpoint_forward(module: Any) -> None:
    """Run `module`'s forward under torch's checkpoint while training with grad (its module
    hooks stay outside, as transformers does for whole layers)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    forward = module.forward

    def recomputed(*args: Any, **kwargs: Any) -> Any:
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = recomputed
