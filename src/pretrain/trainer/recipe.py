"""Pure derivations from the job spec: the DeepSpeed config and the learning-rate schedule.

Nothing here imports torch or DeepSpeed, so the operator, the CLI and the tests can call it. No
example carries a hand-written DeepSpeed config: this module is the only place one is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pretrain.api.spec import PretrainJobSpec
from pretrain.api.validation import total_steps


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    world_size: int
    accumulation: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch  # multiplied by sequence length by callers that know it


def batch_plan(spec: PretrainJobSpec, world_size: int | None = None) -> BatchPlan:
    world = world_size or spec.world_size
    t = spec.training
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise ValueError(
            f"training.globalBatchSize {t.global_batch_size} is not divisible by microBatchSize x world size ({per_step})"
        )
    return BatchPlan(t.global_batch_size, t.micro_batch_size, world, t.global_batch_size // per_step)


def deepspeed_config(spec: PretrainJobSpec, world_size: int | None = None, *, gpu: bool = False) -> dict[str, Any]:
    """The DeepSpeed config for this job at this world size."""
    t = spec.training
    plan = batch_plan(spec, world_size)
    zero: dict[str, Any] = {"stage": t.zero.stage}
    if t.zero.stage >= 1:
        zero.update({"contiguous_gradients": True, "overlap_comm": gpu, "reduce_scatter": True})
    if t.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if t.zero.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    if t.zero.stage == 3:
        # Lets the final export gather full weights from the shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {
            "enabled": t.precision == "fp16",
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
        },
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "seed": t.seed,
    }
    if t.grad_clip > 0:
        cfg["gradient_clipping"] = t.grad_clip
    if t.zero.offload_optimizer:
        # Offload needs DeepSpeed's own CPU Adam (built on first use); otherwise the trainer
        # passes a torch AdamW and nothing is compiled.
        o = t.optimizer
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay},
        }
    return cfg


def lr_multiplier(step: int, spec: PretrainJobSpec) -> float:
    """Learning rate at optimizer step `step` (0-based) as a multiple of the peak lr:
    linear warm-up, then cosine/linear decay to minLr at the last step, or constant; or wsd:
    the peak held until the last decaySteps, which decay to minLr."""
    steps = total_steps(spec) or 1
    sched = spec.training.schedule
    floor = sched.min_lr / spec.training.optimizer.lr
    warmup = min(sched.warmup_steps, max(steps - 1, 0))
    if step < warmup:
        return (step + 1) / warmup
    if sched.decay == "constant":
        return 1.0
    start: int = warmup
    shape: str = sched.decay
    if sched.decay == "wsd":
        start = max(warmup, steps - wsd_decay_steps(spec))
        shape = sched.decay_shape
        if step < start:
            return 1.0
    progress = min(1.0, (step - start) / max(1, steps - 1 - start))
    return floor + (1.0 - floor) * _decayed(shape, progress)


def wsd_decay_steps(spec: PretrainJobSpec) -> int:
    """The steps of a wsd schedule's final decay: decaySteps, or decayFraction of the steps."""
    sched = spec.training.schedule
    return sched.decay_steps or max(1, round(sched.decay_fraction * (total_steps(spec) or 1)))


def _decayed(shape: str, progress: float) -> float:
    """What is left of (peak - floor) at `progress` (0 to 1) through a decay of `shape`."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "sqrt":
        return 1.0 - math.sqrt(progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def model_flops_per_token(n_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token (6N plus attention, as in the PaLM paper's MFU appendix)."""
    return 6.0 * n_params + 12.0 * layers * hidden * seq_len


def mfu(flops_per_token: float, tokens_per_second: float, devices: int, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: the model's FLOPs per second per device over the device's peak
    (None where the peak is unknown, as on a CPU). The one formula the metric, the log line, the
    history (and so the report and MLflow) and bench/train_throughput.py use."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_second / devices / peak_flops
