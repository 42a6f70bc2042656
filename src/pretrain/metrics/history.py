"""The run's durable history: `metrics.jsonl` (and TensorBoard event files) in its checkpoint
location, so that the curves outlive the pods, the Prometheus retention and the run folder.

One JSON object per line, every one with `time` (Unix seconds):
- `{"event": "start", "step": S, "attempt": A, "world_size": W, "job": {...}}` when an attempt
  starts (S is the step it resumes from: later records of earlier attempts are superseded);
- `{"step", "loss", "lr", "grad_norm", "tokens_per_second", "mfu"}` per logged training step;
- `{"step", "eval_loss", "eval_perplexity"}` (or `eval_<task metric>`) per evaluation;
- `{"event": "checkpoint", "step", "seconds", "bytes"}` per verified checkpoint.

Crash safety: a line is written by one `os.write` on an O_APPEND descriptor; a reader skips a
line that does not parse (a torn last line after kill -9 or a full disk), and a writer that finds
the file not ending in a newline ends it first. Object storage has no append: rank 0 appends to a
local copy and puts the whole file (one atomic PUT) after every checkpoint and at the end; a
restarted attempt downloads it first.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from pretrain.storage.fs import is_local, local_path, upload_dir, with_retries

log = logging.getLogger("pretrain.trainer")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
#: A reader refuses a history larger than this (no unbounded read of a bucket's object).
MAX_HISTORY_BYTES = 256 * 2**20

#: TensorBoard tag of each record key.
TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "tokens_per_second": "train/tokens_per_second", "mfu": "train/mfu",
}  # fmt: skip


def parse_history(text: str) -> list[dict[str, Any]]:
    """Every record that parses and has the right types, in order (a torn, foreign or
    hand-broken line is skipped; `check_history` says which and why)."""
    return check_history(text)[0]


#: Keys that are numbers wherever they appear (the step's curves and evaluation scores).
_NUMBER_KEYS = ("loss", "lr", "grad_norm", "tokens_per_second", "mfu", "seconds", "tokens")


def record_problem(rec: Any) -> str | None:
    """Why a parsed line is not a usable record, or None: a step must be a whole number >= 0, an
    event a string, and the curves' values finite numbers (null allowed: a NaN is written so)."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    step = rec.get("step")
    if "step" in rec and not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2**53):
        return f"step is {json.dumps(step)[:40]}, not a whole number >= 0"
    if "event" in rec and not isinstance(rec["event"], str):
        return "event is not a string"
    for key, value in rec.items():
        numeric = key in _NUMBER_KEYS or key.startswith("eval_")
        if numeric and value is not None and not _finite_number(value):
            return f"{key} is {json.dumps(value)[:40]}, not a finite number"
    return None


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_history(text: str) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """(usable records, [(line number, why skipped)]) of a metrics.jsonl's text."""
    out, skipped = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # NaN and Infinity parse (as Python floats), and are refused below
            skipped.append((number, "not JSON"))
            continue
        problem = record_problem(rec)
        if problem is None:
            out.append(rec)
        else:
            skipped.append((number, problem))
    return out, skipped


def current_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the run as it stands: an attempt that resumed from step S supersedes what
    earlier attempts logged after S (those steps were trained again)."""
    out: list[dict[str, Any]] = []
    for rec in records:
        if rec.get("event") == "start":
            resumed = int(rec.get("step") or 0)
            out = [r for r in out if r.get("event") == "start" or int(r.get("step") or 0) <= resumed]
        out.append(rec)
    return out


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: such values are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class HistoryMirror(Protocol):
    """Another home of the history's records (metrics/mlflow.py: an MLflow run)."""

    def add(self, record: dict[str, Any]) -> None: ...

    def close(self, *, failed: bool = False) -> None: ...


class RunHistory:
    """Rank 0's writer of metrics.jsonl and the TensorBoard scalars; other ranks hold a disabled one."""

    #: Told every record and the close, when the run is tracked elsewhere too (monitoring.mlflow).
    mirror: HistoryMirror | None = None

    def __init__(self, uri: str, workdir: Path, storage_options: dict[str, Any] | None = None, *, enabled: bool = True,
                 tensorboard: bool = False) -> None:  # fmt: skip
        self.enabled = enabled
        self.remote = not is_local(uri)
        self.uri = uri.rstrip("/")
        self.options = storage_options or {}
        base = workdir if self.remote else local_path(uri)
        self.path = base / METRICS_FILE
        self.tb_dir = base / TENSORBOARD_DIR
        self._tb: Any = None
        if not enabled:
            return
        base.mkdir(parents=True, exist_ok=True)
        if self.remote:
            self._download()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.tb_dir))

    @classmethod
    def off(cls, workdir: Path) -> RunHistory:
        """A history that writes nothing (ranks other than 0, and before the run starts)."""
        return cls(str(workdir), workdir, enabled=False)

    def _download(self) -> None:
        import fsspec

        fs, root = fsspec.core.url_to_fs(f"{self.uri}/{METRICS_FILE}", **self.options)
        if not with_retries("read metrics.jsonl", lambda: fs.exists(root)):
            return
        if fs.size(root) > MAX_HISTORY_BYTES:
            log.warning(
                "%s/%s is larger than %d bytes: starting a new history", self.uri, METRICS_FILE, MAX_HISTORY_BYTES
            )
            return
        with_retries("read metrics.jsonl", lambda: fs.get_file(root, str(self.path)))

    def records(self) -> list[dict[str, Any]]:
        """The run's records as they stand (a resumed attempt's include the earlier ones')."""
        if not self.enabled or not self.path.exists():
            return []
        return current_records(parse_history(self.path.read_text(errors="replace")))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), **{k: _clean(v) for k, v in record.items()}}
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:  # end a torn last line first, so the new record stands on its own line
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        line = b"\n" + line
            os.write(fd, line)
        finally:
            os.close(fd)
        if self.mirror is not None:
            self.mirror.add(rec)
        if self._tb is not None and "step" in rec and rec.get("event") is None:
            for key, value in rec.items():
                tag = TAGS.get(key) or (f"eval/{key[5:]}" if key.startswith("eval_") else None)
                if tag and isinstance(value, int | float):
                    self._tb.add_scalar(tag, value, int(rec["step"]), walltime=rec["time"])

    def sync(self) -> None:
        """Make what was logged durable where the checkpoints are (a PUT on object storage)."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.flush()
        if not self.remote:
            return
        import fsspec

        fs, root = fsspec.core.url_to_fs(f"{self.uri}/{METRICS_FILE}", **self.options)
        if self.path.exists():
            with_retries("upload metrics.jsonl", lambda: fs.put_file(str(self.path), root))
        if self._tb is not None and self.tb_dir.exists():
            upload_dir(self.tb_dir, f"{self.uri}/{TENSORBOARD_DIR}", self.options)

    def close(self, *, upload: bool = True) -> None:
        """Flush and (on object storage, unless `upload` is false: an error path, where the
        store may belong to another run now) upload; then stop writing."""
        if upload:
            self.sync()
        self.enabled = False
        if self.mirror is not None:
            self.mirror.close(failed=not upload)
            self.mirror = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
