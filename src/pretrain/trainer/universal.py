"""Resuming a checkpoint at another world size or ZeRO stage, through DeepSpeed's universal format.

A ZeRO checkpoint is cut into one optimizer shard per process, so DeepSpeed loads it only at
the world size (and stage) that wrote it. Its universal format holds each parameter whole, one
folder per parameter (fp32 weights, Adam moments, step), and loads at any world size:
`ds_to_universal` makes it, `"checkpoint": {"load_universal": true}` reads it.

Two gaps in DeepSpeed 0.19 are closed here, so that one converted folder loads at every stage:
the stage-3 loader reads the optimizer's global state, and the model-states file, under other
names than stages 1-2 do, and a stage-3 source has no `step.pt` per parameter nor a whole module
in its model states. `make_loadable_at_any_stage` writes what each loader looks for.

The data order needs nothing: the loader's state is one number, the same at any world size.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, Literal

#: The tag (sub-folder of a step) that holds the step's universal form.
UNIVERSAL = "universal"
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"

ResumeMode = Literal["direct", "universal"]


def resume_mode(
    saved_world: Any, saved_stage: Any, world: int, stage: int, *, checkpoint: str
) -> tuple[ResumeMode | None, str | None]:
    """How a checkpoint written by `saved_world` processes at ZeRO `saved_stage` loads in a run
    of `world` processes at `stage`: as it is, through its universal form, or not at all (the
    reason). Checkpoints from before these fields existed load as they are."""
    if not isinstance(saved_world, int) or not isinstance(saved_stage, int):
        return "direct", None
    if saved_world == world and saved_stage == stage:
        return "direct", None
    if saved_stage == 0 and stage == 0:
        return "direct", None  # no shards: the whole optimizer state is in the model-states file
    if 0 in (saved_stage, stage):
        return None, (
            f"{checkpoint} was written at ZeRO-{saved_stage} and this run uses ZeRO-{stage}: a change between "
            "stage 0 and a sharded stage cannot be converted; set training.zero.stage back to "
            f"{saved_stage}, or start fresh with checkpoint.resume: never and a new checkpoint.uri"
        )
    return "universal", None


def convert(source: Path, out: Path) -> float:
    """Write the universal form of the DeepSpeed checkpoint in `source` to `out` (replaced if
    there); returns the seconds it took. One process, no workers: it runs on global rank 0
    while the other ranks wait, and a process pool forked from a trainer is asking for trouble."""
    from deepspeed.checkpoint import ds_to_universal

    t0 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    args = Namespace(
        input_folder=str(source), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    # Its prints and progress bars are noise in a trainer's log; its errors are raised.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    make_loadable_at_any_stage(out)
    return time.perf_counter() - t0


def make_loadable_at_any_stage(folder: Path) -> None:
    """Complete a converted folder so that the stage 1-2 loader and the stage-3 loader both
    find what they read."""
    import deepspeed
    import torch

    zero = folder / "zero"
    optim_path = zero / "optimizer_state.pt"
    optim: dict[str, Any] = torch.load(optim_path, weights_only=False)
    params = sorted(p for p in zero.iterdir() if p.is_dir())
    if "optimizer_state_dict" in optim:  # converted from ZeRO-3
        step = optim["optimizer_state_dict"]["state"][0]["step"]
        states = torch.load(folder / ZERO3_MODEL_STATES, weights_only=False)
        shapes = _param_shapes(states)
        for p in params:
            # Stage 1-2 read each state as {"param": tensor of the parameter's shape}; the stage-3
            # converter writes flat tensors (the stage-3 loader reads both).
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                f = p / f"{key}.pt"
                value = torch.load(f, weights_only=False) if f.exists() else None
                if isinstance(value, torch.Tensor) and p.name in shapes:
                    torch.save({"param": value.reshape(shapes[p.name]), "cat_dim": 0}, f)
            if not (p / "step.pt").exists():
                torch.save(step, p / "step.pt")
        optim.setdefault("ds_version", deepspeed.__version__)
        optim.pop("fp32_flat_groups", None)  # rank 0's shard: nothing reads it, and it is large
        if not (folder / MODEL_STATES).exists():
            states["module"] = _whole_module(states, zero, shapes)
            torch.save(states, folder / MODEL_STATES)
    else:  # converted from ZeRO-1 or 2
        step_file = next((p / "step.pt" for p in params if (p / "step.pt").exists()), None)
        step = torch.load(step_file, weights_only=False) if step_file else None
        optim["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": optim["param_groups"]}
        if not (folder / ZERO3_MODEL_STATES).exists():
            shutil.copyfile(folder / MODEL_STATES, folder / ZERO3_MODEL_STATES)
    torch.save(optim, optim_path)


def _param_shapes(states: dict[str, Any]) -> dict[str, Any]:
    shapes: dict[str, Any] = {}
    for group in states.get("param_shapes") or []:
        shapes.update(group)
    return shapes


def _whole_module(states: dict[str, Any], zero: Path, shapes: dict[str, Any]) -> dict[str, Any]:
    """The whole module state of a ZeRO-3 checkpoint (whose own holds empty partitions): every
    parameter from its universal fp32 file, tied ones from their source, buffers as saved."""
    import torch

    module: dict[str, Any] = {}
    for name, value in states.get("module", {}).items():
        fp32 = zero / name / "fp32.pt"
        if fp32.exists() and name in shapes:
            saved = torch.load(fp32, weights_only=False)
            flat = saved["param"] if isinstance(saved, dict) else saved
            module[name] = flat.reshape(shapes[name])
        else:
            module[name] = value
    for name, source in (states.get("shared_params") or {}).items():
        if source in module:
            module[name] = module[source]
    return module


def repair_after_load(engine: Any, groups: list[dict[str, Any]]) -> None:
    """Undo two slips of DeepSpeed 0.19's stage-3 universal loader, harmless at stages 1-2:

    - it gives every param group the same `step` tensor object, so each optimizer step adds one
      per group to it and the later groups' bias correction runs ahead (a ZeRO-3 resume drifted
      from the uninterrupted run by 1e-3 in loss within 5 steps; exact with this);
    - it copies the first group's settings onto every group, which would give biases and norms
      the matrices' weight decay."""
    import torch

    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen: set[int] = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))
    loaded = optimizer.param_groups
    if len(loaded) == len(groups):
        for group, want in zip(loaded, groups, strict=True):
            group["weight_decay"] = want["weight_decay"]
