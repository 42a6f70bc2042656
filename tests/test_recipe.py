"""Pure derivations from the spec: DeepSpeed config and learning-rate schedule."""

from __future__ import annotations

import itertools
import math

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


def test_wsd_holds_the_peak_then_decays_over_its_last_steps() -> None:
    """Issue 32 item 3: warm-up, stable at the peak, then decaySteps (or decayFraction of the
    steps) down to minLr, in the chosen shape."""
    base = ("training.maxSteps=100", "training.schedule.warmupSteps=10", "training.optimizer.lr=0.001",
            "training.schedule.minLr=0.0001", "training.schedule.decay=wsd")  # fmt: skip
    m = [lr_multiplier(i, spec(*base, "training.schedule.decaySteps=20")) for i in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert m[10:81] == [1.0] * 71, "stable until the decay's first step (step 80)"
    assert m[90] == pytest.approx(0.1 + 0.9 * (1 - 10 / 19)) and m[99] == pytest.approx(0.1)
    by_fraction = [lr_multiplier(i, spec(*base)) for i in range(100)]  # decayFraction 0.2 of 100
    assert by_fraction == pytest.approx(m)
    sqrt = [lr_multiplier(i, spec(*base, "training.schedule.decayShape=sqrt")) for i in (80, 90, 99)]
    assert sqrt == pytest.approx([1.0, 0.1 + 0.9 * (1 - math.sqrt(10 / 19)), 0.1])
    cosine = lr_multiplier(90, spec(*base, "training.schedule.decayShape=cosine"))
    assert cosine == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 10 / 19)))


def test_a_wsd_decay_branches_from_any_stable_step() -> None:
    """The stable phase does not depend on where the run ends: a run resumed from a stable
    checkpoint at step N with maxSteps N + D and decaySteps D has followed the same lr up to N,
    and decays from there (docs/operations.md, "Branching a decay")."""
    base = ("training.schedule.warmupSteps=10", "training.schedule.decay=wsd", "training.schedule.decaySteps=50")
    long_run = spec(*base, "training.maxSteps=10000")
    branch = spec(*base, "training.maxSteps=350")  # N = 300, D = 50
    assert [lr_multiplier(i, branch) for i in range(300)] == [lr_multiplier(i, long_run) for i in range(300)]
    floor = branch.training.schedule.min_lr / branch.training.optimizer.lr
    assert lr_multiplier(300, branch) == 1.0 and lr_multiplier(349, branch) == pytest.approx(floor)


def test_wsd_fields_are_checked() -> None:
    from pretrain.api.validation import SpecError

    with pytest.raises(SpecError, match=r"spec.training.schedule.decaySteps: only with decay wsd, not cosine"):
        spec("training.schedule.decaySteps=5")
    with pytest.raises(SpecError, match=r"decaySteps: 95 is more than the 100 steps leave after warmupSteps \(10\)"):
        spec("training.maxSteps=100", "training.schedule.warmupSteps=10", "training.schedule.decay=wsd",
             "training.schedule.decaySteps=95")  # fmt: skip


def test_mfu_is_the_models_flops_over_the_devices_peak() -> None:
    """One formula (recipe.mfu) for the metric, the log line and the history: GPT-2 124M at
    1024 tokens is 6N + 12 L H T FLOPs per token; 8 devices at 40,000 tokens/s together."""
    from pretrain.trainer.recipe import mfu, model_flops_per_token

    per_token = model_flops_per_token(124_000_000, 12, 768, 1024)
    assert per_token == 6 * 124_000_000 + 12 * 12 * 768 * 1024
    assert mfu(per_token, 40_000, 8, 1e15) == pytest.approx(per_token * 5_000 / 1e15)
    assert mfu(per_token, 40_000, 8, None) is None, "no peak (a CPU): no MFU"


def test_the_log_line_says_the_mfu_where_it_is_known(caplog: pytest.LogCaptureFixture) -> None:
    from pretrain.trainer.progress import Progress

    progress = Progress(total=100, start=0, enabled=False)
    with caplog.at_level("INFO", logger="pretrain.trainer"):
        progress.log(10, loss=2.5, lr=1e-3, grad_norm=1.0, tokens_per_second=5000.0, mfu=0.4123)
        progress.log(11, loss=2.5, lr=1e-3, grad_norm=1.0, tokens_per_second=5000.0)
    first, second = (r.getMessage() for r in caplog.records)
    assert "tokens/s 5000 mfu 41.2% eta" in first and "mfu" not in second
