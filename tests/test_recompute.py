"""Activation recomputation (issue 32 item 3): full, every k-th layer, or attention only. Every
mode gives the losses and gradients of no recomputation; the layers (or attention blocks) chosen
run their forward twice per step, the others once."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pretrain.api import load_job
from pretrain.api.validation import SpecError
from pretrain.data.tokenizer import bytes_tokenizer
from pretrain.trainer.model import build_model
from pretrain.trainer.recompute import attention_of, layers_of
from tests.conftest import ROOT

TINY = ROOT / "examples" / "tiny-cpu.yaml"
SHAPE = [
    "model.layers=4",
    "model.hidden=32",
    "model.heads=2",
    "model.intermediate=64",
    "model.maxPositions=64",
    "data.sequenceLength=32",
]
MODES = {
    "none": [],
    "full": ["training.gradientCheckpointing=true"],
    "every-2": ["training.selectiveRecompute.every=2"],
    "attention": ["training.selectiveRecompute.part=attention", "training.selectiveRecompute.every=1"],
    "attention-every-3": ["training.selectiveRecompute.part=attention", "training.selectiveRecompute.every=3"],
}
#: Per mode, the layers whose attention runs twice in a step (4 layers).
TWICE = {"none": [], "full": [0, 1, 2, 3], "every-2": [0, 2], "attention": [0, 1, 2, 3], "attention-every-3": [0, 3]}


def step(family: str, mode: str) -> tuple[float, list[Any], list[int]]:
    """One forward and backward from the same weights and batch: (loss, grads, attention
    forward calls per layer)."""
    spec = load_job(TINY, [*SHAPE, f"model.family={family}", *MODES[mode]]).spec
    torch.manual_seed(0)
    model = build_model(spec, bytes_tokenizer())
    model.train()
    calls = [0] * len(layers_of(model))
    for i, layer in enumerate(layers_of(model)):
        attn = attention_of(layer)
        leaf = next(m for m in attn.modules() if m is not attn and not list(m.children()))  # runs inside forward

        def count(*_: Any, i: int = i) -> None:
            calls[i] += 1

        leaf.register_forward_hook(count)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), [p.grad.clone() for p in model.parameters()], calls


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_mode_trains_as_no_recomputation_and_recomputes_what_it_says(family: str) -> None:
    base_loss, base_grads, base_calls = step(family, "none")
    assert base_calls == [1, 1, 1, 1]
    for mode in MODES:
        loss, grads, calls = step(family, mode)
        assert loss == base_loss, mode
        for got, want in zip(grads, base_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=mode)
        assert calls == [2 if i in TWICE[mode] else 1 for i in range(4)], (mode, calls)


def test_selective_and_full_recomputation_exclude_each_other() -> None:
    with pytest.raises(SpecError, match=r"spec.training.selectiveRecompute: set it or gradientCheckpointing"):
        load_job(TINY, ["training.gradientCheckpointing=true", "training.selectiveRecompute.every=2"])
