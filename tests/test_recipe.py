"""Pure derivations from the spec: DeepSpeed config and learning-rate schedule."""

from __future__ import annotations

import itertools

import pytest

from pretrain.api import load_job
from pretrain.trainer.recipe import batch_plan, deepspeed_config, lr_multiplier
from tests.conftest import ROOT

TINY = ROOT / "examples" / "tiny-cpu.yaml"


def spec(*overrides: str):  # type: ignore[no-untyped-def]
    return load_job(TINY, list(overrides)).spec


def test_accumulation_is_derived_from_batch_and_world() -> None:
    s = spec("training.globalBatchSize=64", "training.microBatchSize=4")
    assert batch_plan(s).accumulation == 8  # world 2
    assert batch_plan(s, world_size=16).accumulation == 1
    with pytest.raises(ValueError, match="not divisible"):
        batch_plan(s, world_size=3)
    cfg = deepspeed_config(s)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        64,
        4,
        8,
    )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_sections(stage: int) -> None:
    cfg = deepspeed_config(spec(f"training.zero.stage={stage}"))
    assert cfg["zero_optimization"]["stage"] == stage
    assert ("stage3_gather_16bit_weights_on_model_save" in cfg["zero_optimization"]) == (stage == 3)
    assert "optimizer" not in cfg, "without offload the trainer passes torch's AdamW"


def test_offload_uses_deepspeed_adamw_and_precision_flags() -> None:
    cfg = deepspeed_config(spec("training.zero.stage=3", "training.zero.offloadOptimizer=true",
                                "training.zero.offloadParams=true", "training.precision=bf16"))  # fmt: skip
    z = cfg["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["weight_decay"] == 0.01
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert "gradient_clipping" not in deepspeed_config(spec("training.gradClip=0"))


def test_schedule_warmup_then_cosine_to_min() -> None:
    s = spec("training.maxSteps=100", "training.schedule.warmupSteps=10", "training.optimizer.lr=0.001",
             "training.schedule.minLr=0.0001")  # fmt: skip
    m = [lr_multiplier(i, s) for i in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(m[9:])), "decays monotonically"
    assert m[99] == pytest.approx(0.1)  # minLr / lr
    assert m[54] == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02)  # half-way: the cosine's middle


def test_linear_and_constant_schedules() -> None:
    lin = spec("training.maxSteps=11", "training.schedule.warmupSteps=0", "training.schedule.decay=linear",
               "training.schedule.minLr=0")  # fmt: skip
    assert [round(lr_multiplier(i, lin), 3) for i in (0, 5, 10)] == [1.0, 0.5, 0.0]
    const = spec("training.schedule.decay=constant")
    assert lr_multiplier(400, const) == 1.0


def test_weight_decay_groups_skip_biases_and_norms() -> None:
    from pretrain.data.tokenizer import bytes_tokenizer
    from pretrain.trainer.model import build_model, parameter_groups

    model = build_model(spec("model.layers=1", "model.hidden=32", "model.heads=2"), bytes_tokenizer())
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("ln_" in names[id(p)] or names[id(p)].endswith("bias") for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_model_factory_builds_each_family(family: str) -> None:
    from pretrain.data.tokenizer import bytes_tokenizer
    from pretrain.trainer.model import build_model

    objective = "mlm" if family == "bert" else "clm"
    s = spec(f"model.family={family}", f"objective.type={objective}", "model.layers=2", "model.hidden=64",
             "model.heads=4", "model.intermediate=128")  # fmt: skip
    model = build_model(s, bytes_tokenizer())
    assert model.config.model_type == family
    assert model.config.vocab_size == 320  # 260 tokens padded to a multiple of 64
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
