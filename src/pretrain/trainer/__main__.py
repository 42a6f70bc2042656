"""Entry point of a worker: ``torchrun ... -m pretrain.trainer --config job.json [--workdir DIR]``.

Exit status 0 on success (or a requested stop after its checkpoint), 1 with a one-line
``error:`` as the last log line for a problem the user can fix, 2 for a crash (with traceback,
and torchelastic's error file through @record).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from pretrain.api.spec import PretrainJob
from pretrain.api.validation import SpecError, parse_job
from pretrain.contract import ENV_WORKDIR
from pretrain.data.sources import DataError
from pretrain.proc import die_with_parent
from pretrain.storage.fs import StorageError, is_local, local_path, out_of_space
from pretrain.termination import write_reason
from pretrain.trainer.guard import GuardError

log = logging.getLogger("pretrain.trainer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.trainer", allow_abbrev=False)
    p.add_argument("--config", required=True, help="The job as JSON or YAML (a whole PretrainJob document).")
    p.add_argument(
        "--workdir",
        default=os.environ.get(ENV_WORKDIR, "pretrain-work"),
        help="Node-local scratch: prepared data, tokenizer, checkpoint staging (default $PRETRAIN_WORKDIR).",
    )
    return p.parse_args(argv)


def report(reason: str) -> None:
    """Log `error: <reason>` and leave it as the termination message (the first rank's wins)."""
    log.error("error: %s", reason)
    write_reason(reason)


def main(argv: list[str] | None = None) -> int:
    # torchrun starts its workers in sessions of their own: if torchrun itself is killed (-9, the
    # OOM killer), nothing else would stop them.
    die_with_parent(signal.SIGKILL)
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    from pretrain.trainer.loop import configure_logging

    configure_logging(rank)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")
    try:
        from pretrain.api.validation import read_document

        text = Path(args.config).read_text()
        doc = json.loads(text) if text.lstrip().startswith("{") else read_document(text, args.config)
        job = parse_job(doc)
    except (OSError, json.JSONDecodeError) as e:
        report(f"cannot read the job config {args.config}: {e}")
        return 1
    except SpecError as e:
        report(f"invalid job config {args.config}: {e}")
        return 1
    if job.spec.resources.accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from torch.distributed.elastic.multiprocessing.errors import record

    from pretrain.trainer.loop import Trainer

    @record
    def train() -> int:
        return Trainer(job, Path(args.workdir)).run()

    try:
        code = train() or 0
        return code
    except (DataError, StorageError, SpecError, GuardError) as e:  # CheckpointError is a StorageError
        report(str(e))
        return 1
    except Exception as e:
        log.exception("training failed")
        full = next(filter(None, (out_of_space(where) for where in _local_folders(job, Path(args.workdir)))), None)
        report(f"training failed: {full + ': ' if full else ''}{e.__class__.__name__}: {str(e).strip()[:500]}")
        return 2


def _local_folders(job: PretrainJob, workdir: Path) -> list[Path]:
    """The disks a run writes to: its work folder and a local checkpoint folder."""
    uri = job.spec.checkpoint.uri
    return [workdir] + ([local_path(uri)] if uri and is_local(uri) else [])


if __name__ == "__main__":
    sys.exit(main())
