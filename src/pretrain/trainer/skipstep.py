"""`training.guard.action: skip`: a bad step is not applied, decided on the device before the
optimizer steps, with no host sync (issue 29 item 1).

The host learns of a step's loss only at the next sync point, after its update is made; to leave
a step out, the decision has to come before. `StepGate.judge` takes the step's loss averaged over
every rank (one all-reduce of a scalar, queued on the device like the step's own collectives),
and decides as `guard.LossGuard` does (non-finite, or `spikeZScore` above the mean of the last
`windowSteps` good losses after `minHistorySteps`) with tensor operations into `factor`: 1 to
apply the step, 0 to skip it. `SkipStepAdamW`, AdamW with every change scaled by that factor (as
OLMo-core's skip-step optimizers do), then leaves weights, moments and its step count unchanged on
a skipped step, and skips too when any gradient is not finite. Every rank decides alike: the
averaged loss and the window are the same everywhere. The flag travels back with the losses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from pretrain.api.spec import GuardSpec


class StepGate:
    """The device-side judge of each step's loss, and the factor the optimizer reads."""

    def __init__(self, spec: GuardSpec, device: Any) -> None:
        self.spec = spec
        self.window = torch.zeros(spec.window_steps, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # good losses seen
        #: 1.0: apply the step; 0.0: skip it. Set by `judge`, lowered by the optimizer on
        #: non-finite gradients; read back (as the skipped flag) with the step's loss.
        self.factor = torch.ones((), dtype=torch.float32, device=device)

    def judge(self, loss: torch.Tensor) -> None:
        """Decide the step of `loss` (the mean over every rank) and add it to the window if good."""
        loss = loss.detach().to(torch.float64)
        size = self.window.numel()
        n = torch.clamp(self.count, max=size)
        mask = torch.arange(size, device=self.window.device) < n
        seen = torch.clamp(n, min=1).to(torch.float64)
        mean = (self.window * mask).sum() / seen
        std = torch.sqrt((((self.window - mean) * mask) ** 2).sum() / seen)
        z = torch.where(std > 0, (loss - mean) / torch.where(std > 0, std, 1.0),
                        torch.where(loss > mean, torch.inf, 0.0))  # fmt: skip
        limit = self.spec.spike_z_score
        spike = (n >= self.spec.min_history_steps) & (z > limit) if limit else torch.zeros_like(mask[0])
        good = torch.isfinite(loss) & ~spike
        slot = (self.count % size).view(1)
        self.window.scatter_(0, slot, torch.where(good, loss, self.window.gather(0, slot)[0]).view(1))
        self.count += good.to(torch.int64)
        self.factor.copy_(good.to(torch.float32))

    def skipped(self) -> torch.Tensor:
        """1.0 when the step just made was skipped (a copy: the factor changes at the next step)."""
        return 1.0 - self.factor.detach().clone()


class SkipStepAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, the state of torch's AdamW: `step`,
    `exp_avg`, `exp_avg_sq`) whose every change is scaled by `gate.factor`: a skipped step leaves
    the weights, the moments and the step count as they were."""

    def __init__(self, params: Iterable[Any], gate: StepGate, *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float = 0.01) -> None:  # fmt: skip
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.gate = gate

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        self.gate.factor.mul_(finite.to(self.gate.factor.device, torch.float32))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, self.gate.factor.to(p.device, p.dtype))

    def _update(self, p: torch.Tensor, group: dict[str, Any], factor: torch.Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        assert p.grad is not None
        grad = p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # a skipped step's NaN must not reach the moments
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state["step"] += factor
        p.mul_(1 - lr * decay * factor)
        state["exp_avg"].lerp_(grad, (1 - beta1) * factor)
        state["exp_avg_sq"].lerp_(grad * grad, (1 - beta2) * factor)
        step = torch.clamp(state["step"], min=1.0)  # a first step skipped: nothing to correct yet
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(eps)
        p.sub_(state["exp_avg"] / denom * (lr * factor / (1 - beta1**step)))
