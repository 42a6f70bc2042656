"""`pretrain run` (the job on this machine, through torchrun) and `pretrain generate`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from pretrain import objectives, tasks
from pretrain.api.validation import load_job, parse_job
from pretrain.clitools import friendly_errors, set_option, shown
from pretrain.contract import ENV_TERMINATION_LOG, trainer_command
from pretrain.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--nproc", type=click.IntRange(min=1), default=None, help="Processes (default: nodes x procsPerNode).")
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder (default ./runs/<name>).",
)
@click.option(
    "--verbose",
    is_flag=True,
    help="Also show torchrun's failure report (tracebacks); it is always in work/launcher.log.",
)
@set_option
@friendly_errors
def run(file: Path, nproc: int | None, output: Path | None, verbose: bool, overrides: tuple[str, ...]) -> None:
    """Run a PretrainJob on this machine with torchrun (CPU or GPU).

    A second run of the same job resumes from its newest verified checkpoint. Ctrl-C or SIGTERM
    saves a checkpoint and stops.
    """
    # --nproc decides the world size before validation: batch arithmetic is checked at the size
    # that will run, not at the file's own.
    one_machine = ("resources.nodes=1", f"resources.procsPerNode={nproc}") if nproc else ()
    job = load_job(file, [*overrides, *one_machine])
    doc: dict[str, Any] = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    doc.pop("status", None)
    res = doc["spec"]["resources"]
    procs = nproc or job.spec.world_size
    res["nodes"], res["procsPerNode"] = 1, procs  # one machine: all processes on "node 0"
    out = (output or Path("runs") / job.metadata.name).resolve()
    ckpt = doc["spec"]["checkpoint"]
    ckpt.setdefault("uri", str(out / "checkpoints"))
    job = parse_job(doc)  # re-check batch arithmetic at this world size
    out.mkdir(parents=True, exist_ok=True)
    locks = [hold_lock(out, "run folder")]  # released by the kernel when this process ends, however
    ckpt_uri = job.spec.checkpoint.uri or ""
    if "://" not in ckpt_uri and not Path(ckpt_uri).resolve().is_relative_to(out):
        Path(ckpt_uri).mkdir(parents=True, exist_ok=True)
        locks.append(hold_lock(Path(ckpt_uri), "checkpoint folder"))
    config = out / "job.json"
    config.write_text(job.model_dump_json(by_alias=True, exclude_none=True, indent=1))
    cmd = trainer_command(
        nnodes=1, nproc_per_node=procs, node_rank=0, master_addr="127.0.0.1", master_port=free_port(),
        config=str(config), workdir=str(out / "work"),
    )  # fmt: skip
    reason_file = out / "work" / "termination.log"  # the trainer's one-line reason, if it fails
    env = _worker_env(job, out, procs, reason_file)
    click.echo(f"run folder: {shown(out)}", err=True)
    click.echo(f"checkpoints: {shown(job.spec.checkpoint.uri or '')}", err=True)
    click.echo(f"metrics: http://127.0.0.1:{job.spec.monitoring.metrics_port}/metrics (rank 0)", err=True)
    code, hidden = _supervise([sys.executable, "-m", "torch.distributed.run", *cmd[1:]], env,
                              out / "work" / "launcher.log", verbose)  # fmt: skip
    _report_end(job, out, code, hidden, reason_file)


def _worker_env(job: Any, out: Path, procs: int, reason_file: Path) -> dict[str, str]:
    """torchrun's environment: CPU threads shared among the processes, the save-on-stop grace,
    a TMPDIR in the run folder, and where the trainer leaves its one-line reason."""
    env = dict(os.environ)
    if job.spec.resources.accelerator == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torchrun gives its workers 30 s after SIGTERM, then SIGKILL: too little for the checkpoint
    # a Ctrl-C asks for on a large model. Pods get their grace period (operator/children.py).
    env.setdefault(TORCHRUN_SHUTDOWN_TIMEOUT, str(LOCAL_SHUTDOWN_SECONDS))
    tmp = out / "tmp"  # torchelastic leaves folders in TMPDIR
    tmp.mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp)
    reason_file.parent.mkdir(parents=True, exist_ok=True)
    reason_file.unlink(missing_ok=True)
    env[ENV_TERMINATION_LOG] = str(reason_file)
    env["PATH"] = interpreter_first(env.get("PATH", ""))
    return env


def interpreter_first(path: str) -> str:
    """PATH with this interpreter's bin folder first, as an activated venv has it: the workers'
    JIT builds then run the ninja installed beside torch. A system ninja of another version
    earlier on PATH reads the build's logs as foreign and rebuilds DeepSpeed's CPU op from
    scratch, 1-3 minutes each time runs with and without the venv on PATH share one cache (ninja
    1.11 and 1.13 alternated 6 times in one CI run)."""
    own = str(Path(sys.executable).parent)
    parts = [p for p in path.split(os.pathsep) if p and p != own]
    return os.pathsep.join([own, *parts])


def _report_end(job: Any, out: Path, code: int, hidden: int, reason_file: Path) -> None:
    """The run's last lines: where the model is, what a stop saved, or why it failed (exit 1)."""
    if code == 0:
        final = f"{job.spec.checkpoint.uri}/final"
        if (Path(final) / "config.json").exists() or "://" in final:
            click.echo(f"final model: {shown(final)}", err=True)
            click.echo(f"try: pretrain generate --model {shown(final)} --prompt 'ROMEO:'", err=True)
            click.echo(f"curves: pretrain report {shown(out)}", err=True)
        return
    if code in (130, -signal.SIGINT, 128 + signal.SIGTERM):
        click.echo(f"stopped: {stop_outcome(job, out)}", err=True)
        sys.exit(130)
    reason = reason_file.read_text().strip() if reason_file.is_file() else ""
    if hidden:
        click.echo(f"(torchrun's failure report, {hidden} lines: {shown(out / 'work' / 'launcher.log')}, "
                   "or run again with --verbose)", err=True)  # fmt: skip
    if reason:
        raise UserError(reason)  # the trainer's own words, as the last line
    raise UserError(f"training failed (exit code {code}); the trainer's last lines above say why")


def stop_outcome(job: Any, out: Path) -> str:
    """What a stop left, as the checkpoint folder says (a step counts when its manifest is
    there), against the last step the run logged: a save on stop can fail, and then the steps
    since the previous checkpoint are lost."""
    import json
    import tempfile

    from pretrain.storage.checkpoint import INTERACTIVE_ATTEMPTS, CheckpointStore
    from pretrain.storage.manifest import step_name

    last = None
    with contextlib.suppress(OSError, ValueError):
        lines = (out / "work" / "train_log.jsonl").read_text().splitlines()
        steps = [int(e["step"]) for e in map(json.loads, lines[-1000:]) if "loss" in e]
        last = steps[-1] if steps else None  # this attempt's last step (the file spans attempts)
    c = job.spec.checkpoint
    try:
        with tempfile.TemporaryDirectory(prefix="pretrain-stop-") as tmp:
            store = CheckpointStore(
                c.uri, workdir=Path(tmp), storage_options=dict(c.storage_options), retry_attempts=INTERACTIVE_ATTEMPTS
            )
            complete = store.complete_steps()
    except Exception as e:
        return f"the checkpoints in {shown(c.uri)} could not be read ({e.__class__.__name__}: {e})"
    newest = complete[-1] if complete else None
    if newest is None:
        return "no checkpoint was saved; running the same command again starts from step 0"
    if last is not None and newest < last:
        return (f"checkpoint {step_name(last)} was NOT saved; running the same command again resumes from "
                f"{step_name(newest)} (steps {newest + 1}-{last} are lost)")  # fmt: skip
    return f"checkpoint {step_name(newest)} is saved; run the same command again to resume from it"


LOCK_FILE = ".pretrain-run.lock"


def hold_lock(folder: Path, what: str) -> Any:
    """An exclusive lock on `folder` for as long as this process lives: two `pretrain run` of one
    job would mix one's weights with the other's optimizer state in the same checkpoints. The
    kernel drops the lock when the process ends, even by kill -9."""
    import fcntl

    f = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - held open until the process ends
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{what} {shown(folder)} is in use by another `pretrain run` ({holder}); "
                        "wait for it to end, or give this run its own --output") from None  # fmt: skip
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher dies (even by kill -9), so that
    torchrun stops its workers (they checkpoint on SIGTERM) instead of running on, orphaned."""
    from pretrain.proc import die_with_parent

    die_with_parent(signal.SIGTERM)


#: torchrun's wait for its workers after a signal before SIGKILL (torch >= 2.7 reads it).
TORCHRUN_SHUTDOWN_TIMEOUT = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
LOCAL_SHUTDOWN_SECONDS = 1800


def _supervise(cmd: list[str], env: dict[str, str], log_path: Path, verbose: bool) -> tuple[int, int]:
    """Run torchrun, forwarding SIGTERM and Ctrl-C so the workers can checkpoint and exit. Its
    output goes through runlog.ReportFilter (everything into `log_path`). Returns the exit code
    and how many lines of failure report were kept from the screen."""
    import threading

    from pretrain.runlog import pump

    proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = open(log_path, "ab")  # noqa: SIM115 - closed below, after both pumps end
    lock = threading.Lock()

    def keep(b: bytes) -> None:
        with lock:
            log.write(b)

    filters: list[Any] = []
    pumps = [
        threading.Thread(target=lambda s=s, o=o: filters.append(pump(s, o, keep, verbose)), daemon=True)
        for s, o in ((proc.stdout, sys.stdout.buffer), (proc.stderr, sys.stderr.buffer))
    ]
    for t in pumps:
        t.start()
    interrupted = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    old_term = signal.signal(signal.SIGTERM, forward)
    old_int = signal.signal(signal.SIGINT, forward)
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                forward(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        for t in pumps:
            t.join(30)
        log.close()
    hidden = sum(f.hidden for f in filters)
    return (130 if interrupted else code), hidden


def load_export(model_uri: str) -> Path:
    """A local copy of an exported model (…/final), with transformers' chatter turned down."""
    import tempfile

    from transformers.utils import logging as hf_logging

    from pretrain.storage.fs import download_dir

    path = download_dir(model_uri, Path(tempfile.mkdtemp(prefix="pretrain-model-")))
    if not (path / "config.json").is_file():
        raise UserError(f"--model: {model_uri} holds no exported model (config.json is missing)")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return path


#: Bounds of `pretrain generate`: a sample is tokens on a screen, not a background job.
MAX_NEW_TOKENS = 100_000
MAX_SAMPLES = 256


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """click's FloatRange lets NaN through (every comparison with it is false)."""
    import math

    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value


@click.command()
@click.option("--model", "model_uri", required=True, help="An exported model directory or URI (…/final).")
@click.option("--prompt", default="", help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1, max=MAX_NEW_TOKENS), default=200, show_default=True,
              help=f"At most {MAX_NEW_TOKENS} (longer samples slide a window over the model's positions).")  # fmt: skip
@click.option("--temperature", type=click.FloatRange(min=0.0, max=100.0), default=0.8, show_default=True,
              callback=_finite, help="0: greedy.")  # fmt: skip
@click.option("--top-k", type=click.IntRange(min=0, max=2**31 - 1), default=50, show_default=True, help="0: off.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True,
              callback=_finite)  # fmt: skip
@click.option(
    "--seed", type=click.IntRange(min=0, max=2**63 - 1), default=None, help="Sampling seed, for repeatable output."
)
@click.option("--num-samples", type=click.IntRange(min=1, max=MAX_SAMPLES), default=1, show_default=True)
@friendly_errors
def generate(
    model_uri: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
    seed: int | None, num_samples: int,
) -> None:  # fmt: skip
    """Generate text from an exported model."""
    path = load_export(model_uri)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if seed is not None:
        torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(str(path))
    if config.model_type == "bert":
        raise UserError(f"--model: {model_uri} is a masked LM (bert); generation needs a causal model")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        ids = torch.tensor([[tok.eos_token_id]])
    window = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 1024))
    out = ids.repeat(num_samples, 1)
    with torch.no_grad():
        # Slide a window so a long sample never reaches positions the model was not trained on.
        while out.shape[1] - ids.shape[1] < max_new_tokens:
            context = out[:, -(window // 2) :] if out.shape[1] >= window else out
            room = min(window - context.shape[1], max_new_tokens - (out.shape[1] - ids.shape[1]))
            step = model.generate(
                context, max_new_tokens=room, do_sample=temperature > 0, temperature=temperature or None,
                top_k=top_k or None, top_p=top_p, pad_token_id=tok.pad_token_id, eos_token_id=None,
                attention_mask=torch.ones_like(context),
            )  # fmt: skip
            out = torch.cat([out, step[:, context.shape[1] :]], dim=1)
    for i, seq in enumerate(out):
        if num_samples > 1:
            click.echo(f"--- sample {i + 1}")
        click.echo(tok.decode(seq, skip_special_tokens=True))


@click.command("eval")
@click.option("--model", "model_uri", required=True, help="An exported model directory or URI (…/final).")
@click.option("--data", "data_uri", required=True, help="Path, glob or URI of the evaluation data.")
@click.option(
    "--objective",
    type=click.Choice(objectives.names()),
    required=True,
)
@click.option("--text-field", default="text", show_default=True)
@click.option("--label-field", default="label", show_default=True)
@click.option("--max-length", type=click.IntRange(min=8), default=128, show_default=True, help="Tokens per example.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--max-batches", type=click.IntRange(min=1), default=200, show_default=True, help="Language modelling only."
)
@friendly_errors
def evaluate(
    model_uri: str, data_uri: str, objective: str, text_field: str, label_field: str, max_length: int,
    batch_size: int, max_batches: int,
) -> None:  # fmt: skip
    """Evaluate an exported model on data without training: perplexity (clm, mlm) or task metrics."""
    import json

    from pretrain.api.spec import DataSourceSpec, DataSpec, ObjectiveSpec
    from pretrain.data.sources import DataError

    path = load_export(model_uri)
    from transformers import AutoConfig, AutoTokenizer

    from pretrain.trainer.model import auto_class

    config = AutoConfig.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    model = auto_class(objective).from_pretrained(str(path)).eval()
    data = DataSpec(sources=[DataSourceSpec(uri=data_uri, text_field=text_field)], sequence_length=max_length,
                    validation_split=0.0)  # fmt: skip
    try:
        task = tasks.get(objective)
        if not task.fine_tuning:
            scores = _perplexity(model, tok, data, objective, batch_size, max_batches)
        else:
            from pretrain.data import labeled
            from pretrain.trainer.evaluator import evaluate_task
            from pretrain.trainer.world import World

            obj = ObjectiveSpec(type=objective, label_field=label_field)
            names = [config.id2label[i] for i in range(len(config.id2label))] if task.has_labels else []
            rows = labeled.read_rows(data.sources)
            split = tasks.build_split(obj, data, tok, rows, names, training=False)
            scores = evaluate_task(
                model, split, obj, names, rank=0, world=1, micro_batch=batch_size,
                to_device=World().to_device,
            )  # fmt: skip
    except DataError as e:
        raise UserError(str(e)) from None
    click.echo(json.dumps(scores, indent=1))


def _perplexity(model: Any, tok: Any, data: Any, objective: str, batch_size: int, max_batches: int) -> dict[str, float]:
    """Loss and perplexity of an exported model over the first `max_batches` batches of `data`
    packed as training packs it, by the evaluator training uses."""
    import tempfile

    import numpy as np

    from pretrain.data.collator import Collator
    from pretrain.data.loader import PackedSplit
    from pretrain.data.prepare import prepare
    from pretrain.data.tokenizer import fingerprint
    from pretrain.trainer.evaluator import lm_loss_sum, perplexity
    from pretrain.trainer.world import World

    split = PackedSplit(prepare(data, tok, fingerprint(tok), Path(tempfile.mkdtemp(prefix="pretrain-eval-"))), "train")
    collate = Collator(objective=objective, vocab_size=len(tok), mask_token_id=tok.mask_token_id,
                       special_ids=tuple(tok.all_special_ids))  # fmt: skip
    starts = range(0, len(split), batch_size)[:max_batches]
    batches = (split.rows(np.arange(s, min(s + batch_size, len(split)))) for s in starts)
    total, n = lm_loss_sum(model, batches, collate, World().to_device)
    loss = total / max(n, 1)
    return {"loss": loss, "perplexity": perplexity(loss), "sequences": float(n)}
