"""The trainer end to end: 2 processes over gloo on CPU, tiny models, real DeepSpeed."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pretrain.data.loader import PackedSplit, eval_batches
from tests.conftest import subprocess_env
from tests.trainer_runs import Run, command, run_job

pytestmark = pytest.mark.slow

#: fp32 on CPU: stages differ only by reduction order, so losses agree to about 1e-6.
TRAJECTORY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """One run per configuration, shared by the tests that compare them."""
    base = tmp_path_factory.mktemp("trainer")
    configs = {
        "stage0": ["training.zero.stage=0"],
        "stage1": ["training.zero.stage=1"],
        "stage2": ["training.zero.stage=2"],
        "stage3": ["training.zero.stage=3"],
        "stage0-micro4": ["training.zero.stage=0", "training.microBatchSize=4"],
    }
    out = {}
    for name, overrides in configs.items():
        run = run_job(base / name, overrides)
        assert run.proc.returncode == 0, run.output[-3000:]
        out[name] = run
    return out


def assert_learns(run: Run) -> None:
    losses = run.losses()
    assert len(losses) >= 10, run.output[-2000:]
    first, last = losses[1], losses[max(losses)]
    assert all(math.isfinite(v) for v in losses.values())
    assert last < first - 0.5, f"loss did not fall enough: {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_zero_stage_trains(runs: dict[str, Run], stage: int) -> None:
    run = runs[f"stage{stage}"]
    assert_learns(run)
    assert f"ZeRO-{stage}" in run.output
    assert (run.out / "checkpoints" / "step-00000012" / "manifest.json").exists()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_stage0(runs: dict[str, Run], stage: int) -> None:
    ref, other = runs["stage0"].losses(), runs[f"stage{stage}"].losses()
    assert ref.keys() == other.keys()
    for step in ref:
        assert abs(ref[step] - other[step]) < TRAJECTORY_TOLERANCE, (step, ref[step], other[step])


def test_accumulation_matches_bigger_micro_batch(runs: dict[str, Run]) -> None:
    accum, single = runs["stage0"], runs["stage0-micro4"]
    assert "accumulation 2" in accum.output and "accumulation 1" in single.output
    a, b = accum.losses(), single.losses()
    for step in a:
        assert abs(a[step] - b[step]) < TRAJECTORY_TOLERANCE, (step, a[step], b[step])


def test_export_from_zero3_loads_with_plain_transformers(runs: dict[str, Run]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = runs["stage3"].out / "checkpoints" / "final"
    tok = AutoTokenizer.from_pretrained(str(final))
    model = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    # The exported weights are the trained ones: on the trainer's own evaluation batches they
    # give the loss the trainer logged for its final evaluation.
    run = runs["stage3"]
    data_dir = next((run.out / "work" / "data").glob("*/manifest.json")).parent
    val = PackedSplit(data_dir, "val")
    losses = []
    with torch.no_grad():
        for rank in (0, 1):
            for rows in eval_batches(val, rank=rank, world_size=2, micro_batch=2, steps=2):
                ids = torch.from_numpy(rows)
                losses.append(float(model(ids, labels=ids).loss))
    logged = [e["eval_loss"] for e in run.log if "eval_loss" in e][-1]
    assert sum(losses) / len(losses) == pytest.approx(logged, abs=1e-4)
    ids = torch.from_numpy(val.rows(np.arange(1)))
    out = model.generate(ids[:, :5], max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == 25
    assert isinstance(tok.decode(out[0]), str)


def test_generate_command(runs: dict[str, Run]) -> None:
    final = runs["stage2"].out / "checkpoints" / "final"
    proc = subprocess.run(
        [*command(runs["stage2"].out, [])[:3], "generate", "--model", str(final), "--prompt", "KING", "--seed", "3",
         "--max-new-tokens", "30"],
        capture_output=True, text=True, env=subprocess_env(runs["stage2"].out), check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("KING") and len(proc.stdout.strip()) > 20


def test_mlm_trains(tmp_path: Path) -> None:
    run = run_job(tmp_path, ["model.family=bert", "objective.type=mlm", "training.zero.stage=2"])
    assert run.proc.returncode == 0, run.output[-3000:]
    assert_learns(run)
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "checkpoints" / "final"))
    assert model.config.model_type == "bert"


def test_bf16_runs_on_cpu(tmp_path: Path) -> None:
    run = run_job(tmp_path, ["training.precision=bf16", "training.zero.stage=1"])
    assert run.proc.returncode == 0, run.output[-3000:]
    assert "ZeRO-1 bf16" in run.output
    assert_learns(run)


def test_llama_trains(tmp_path: Path) -> None:
    run = run_job(tmp_path, ["model.family=llama", "model.kvHeads=1", "training.zero.stage=1"])
    assert run.proc.returncode == 0, run.output[-3000:]
    assert_learns(run)


def _wait_for_step(log: Path, step: int, proc: subprocess.Popen[str] | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and sum(1 for line in log.read_text().splitlines() if '"loss"' in line) >= step:
            return
        assert proc is None or proc.poll() is None, "run ended before it could be interrupted"
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


def _interrupt(out: Path, cmd: list[str], how: str) -> tuple[int, str]:
    """Start a run, let it save once (its uploader is then running), and stop it as a user or
    a cluster would: Ctrl-C typed into a real terminal (tmux: SIGINT to the foreground process
    group), or SIGTERM to the whole process group (torchrun's `killpg` of its workers, a
    container runtime). Returns the exit code and the output."""
    log = out / "work" / "train_log.jsonl"
    if how == "ctrl-c":
        session = f"pretrain-{os.getpid()}-{out.name}"
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in subprocess_env(out).items() if k.isidentifier())
        script = f"cd {shlex.quote(str(out))} && env {env} {shlex.join(cmd)} > output.txt 2>&1; echo $? > rc.txt"
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", script], check=True)
        try:
            _wait_for_step(log, 5, None)
            subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
            deadline = time.monotonic() + 180
            while not (out / "rc.txt").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], check=False, capture_output=True)
        return int((out / "rc.txt").read_text()), (out / "output.txt").read_text()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(out),
                            cwd=out, start_new_session=True)  # fmt: skip
    _wait_for_step(log, 5, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    return proc.returncode, output


@pytest.mark.parametrize("storage", ["local-zero2", "s3-zero3"])
def test_sigterm_checkpoints_and_resume_continues(tmp_path: Path, storage: str, request: pytest.FixtureRequest) -> None:
    """Issue 27 item 4: the save on stop lands however the stop comes, with a checkpoint saved
    before it (whose uploader process a group signal used to kill), and every line says what
    the manifest says. The run starts from a folder with a canary subfolder: the extension
    cache receives none of it (issue 33 item 2)."""
    # Wider sequences make a step slow enough (~0.1 s) to interrupt mid-run.
    slow = ["model.hidden=128", "model.heads=4", "model.intermediate=256", "model.maxPositions=256",
            "data.sequenceLength=256", "training.maxSteps=40", "checkpoint.intervalSteps=3"]  # fmt: skip
    ckpt_root = None
    if storage == "s3-zero3":
        s3 = request.getfixturevalue("s3")
        bucket = s3.bucket(f"resume-{os.urandom(3).hex()}")
        slow.append("training.zero.stage=3")
        ckpt_root = f"s3://{bucket}"
    else:
        slow.append("training.zero.stage=2")
    ref_opts = [f"checkpoint.uri={ckpt_root}/uninterrupted"] if ckpt_root else []
    run_opts = [f"checkpoint.uri={ckpt_root}/interrupted"] if ckpt_root else []
    reference = run_job(tmp_path / "uninterrupted", slow + ref_opts)
    assert reference.proc.returncode == 0, reference.output[-3000:]

    out = tmp_path / "interrupted"
    (out / "canary").mkdir(parents=True)
    code, first_output = _interrupt(
        out, command(out, slow + run_opts), "ctrl-c" if storage == "local-zero2" else "group"
    )
    assert code == 130, first_output[-3000:]
    assert "failed" not in first_output and "NOT saved" not in first_output, first_output[-3000:]
    took = re.search(r"checkpoint (step-\d{8}) saved ([\d.]+)s after the signal", first_output)
    assert took and 0 < float(took.group(2)) < 120, first_output[-3000:]
    assert f"stopped: checkpoint {took.group(1)} is saved" in first_output
    extensions = Path(subprocess_env(out)["TORCH_EXTENSIONS_DIR"])
    assert not (extensions / "canary").exists() and not (extensions / "work").exists()
    first = Run(out, subprocess.CompletedProcess([], 0, first_output, ""))
    stopped_at = max(first.losses())
    assert 5 <= stopped_at < 40
    ckpt_uri = f"{ckpt_root}/interrupted" if ckpt_root else str(out / "checkpoints")
    from pretrain.storage.checkpoint import CheckpointStore

    assert CheckpointStore(ckpt_uri, workdir=tmp_path / "inspect").manifest(stopped_at) is not None

    resumed = run_job(out, slow + run_opts)
    assert resumed.proc.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {ckpt_uri}/step-{stopped_at:08d} (step {stopped_at})" in resumed.output
    ref, got = reference.losses(), resumed.losses()
    assert max(got) == 40
    for step in range(stopped_at + 1, 41):
        assert abs(ref[step] - got[step]) < 1e-5, (step, ref[step], got[step])


def test_a_flipped_byte_in_any_file_falls_back(runs: dict[str, Run], tmp_path: Path) -> None:
    """Every file of a real ZeRO-3 checkpoint is covered: corrupt any one, resume takes the older."""
    import shutil

    from pretrain.storage.checkpoint import CheckpointStore

    src = runs["stage3"].out / "checkpoints"
    m = CheckpointStore(str(src), workdir=tmp_path / "w").manifest(12)
    assert m is not None and len(m["files"]) >= 6
    for rel in m["files"]:
        root = tmp_path / rel.replace("/", "_")
        shutil.copytree(src, root)
        shutil.copytree(root / "step-00000012", root / "step-00000006")  # an older, intact checkpoint
        manifest = json.loads((root / "step-00000006" / "manifest.json").read_text())
        manifest["step"] = 6
        (root / "step-00000006" / "manifest.json").write_text(json.dumps(manifest))
        target = root / "step-00000012" / rel
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))
        step, notes = CheckpointStore(str(root), workdir=tmp_path / "w2").select("auto")
        assert step == 6, rel
        assert f"{rel} fails its sha256 check" in notes[0]


def test_init_from_an_exported_model(runs: dict[str, Run], tmp_path: Path) -> None:
    """model.initFrom starts from the exported weights: the first loss is the trained one."""
    final = runs["stage0"].out / "checkpoints" / "final"
    run = run_job(tmp_path, [f"model.initFrom={final}", "training.zero.stage=1", "training.maxSteps=3",
                             "training.gradientCheckpointing=true"])  # fmt: skip
    assert run.proc.returncode == 0, run.output[-3000:]
    fresh_first = runs["stage0"].losses()[1]
    trained_last = runs["stage0"].losses()[12]
    first = run.losses()[1]
    assert first < fresh_first - 0.5 and abs(first - trained_last) < 0.3, (first, fresh_first, trained_last)


@pytest.mark.slow
def test_a_wsd_decay_branches_from_a_stable_checkpoint(tmp_path: Path) -> None:
    """Issue 32 item 3, as docs/operations.md says to do it: a wsd run holds the peak lr; its
    stable checkpoint at step 6, copied to a new folder and resumed there with maxSteps 10 (= 6 +
    decaySteps), decays over steps 7-10 to minLr, while the first run stays stable until its
    own decay (steps 9-12)."""
    import shutil

    wsd = ["training.schedule.decay=wsd", "training.schedule.decaySteps=4", "checkpoint.intervalSteps=6",
           "training.optimizer.lr=0.001", "training.schedule.minLr=0.0001"]  # fmt: skip
    main = run_job(tmp_path / "main", wsd, nproc=1)
    assert main.proc.returncode == 0, main.output[-3000:]
    lr = lambda run: {e["step"]: e["lr"] for e in run.log if "lr" in e}  # noqa: E731
    first = lr(main)
    assert [first[s] for s in range(3, 9)] == [pytest.approx(0.001)] * 6, first
    shutil.copytree(tmp_path / "main" / "checkpoints" / "step-00000006",
                    tmp_path / "branch" / "checkpoints" / "step-00000006")  # fmt: skip
    branch = run_job(tmp_path / "branch", [*wsd, "training.maxSteps=10", "checkpoint.resume=6"], nproc=1)
    assert branch.proc.returncode == 0, branch.output[-3000:]
    decayed = lr(branch)
    assert sorted(decayed) == [7, 8, 9, 10], "resumed at step 6"
    # the lr a step logs is the one the next step uses: the decay's 4 steps are 7-10 (1-based)
    assert [decayed[s] for s in range(7, 11)] == pytest.approx([0.0007, 0.0004, 0.0001, 0.0001])
    assert first[10] > 0.0001 and first[12] == pytest.approx(0.0001), "the first run decays at its own end"
