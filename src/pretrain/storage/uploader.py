"""The checkpoint uploader: a child process that hashes and uploads one node's part of a save.

It is a process, not a thread, because hashing and uploading would hold the GIL for stretches
and slow the training loop beside it. It is started with `start_new_session`, so it is in a
session of its own *before* it runs any code: torchrun (`killpg` of each worker's group), a
terminal's Ctrl-C and a container runtime signal whole process groups, and a child in the
trainer's group died of the very SIGTERM that asked the trainer to save, failing that save
(BrokenProcessPool). multiprocessing's spawn cannot start a child in a new session, and the
child's own `setsid()` comes too late (a signal during its interpreter's start kills it).

The protocol is one pickled request per publish on the child's stdin and one pickled reply on
a private copy of its stdout (fd 1 itself goes to stderr, so no stray print corrupts a reply).
The child ends when its stdin closes: at `close()`, or when the trainer dies in any way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from pretrain.storage.fs import StorageError
from pretrain.storage.location import LocationArgs

#: The signals that ask a run to stop; the uploader ignores them (its trainer decides).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class UploadFailed(StorageError):
    """A publish that failed in the uploader; the message names the original error."""


class UploaderProcess:
    """One node's uploader, started on first use; `publish` blocks until its reply."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def publish(self, where: LocationArgs, staging: Path, step: int, node_rank: int) -> int:
        """Publish this node's part of `step` from `staging` (publish.publish_part, in the child);
        returns the bytes."""
        with self._lock:
            proc = self._start()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                pickle.dump((where, staging, step, node_rank), proc.stdin)
                proc.stdin.flush()
                kind, value = pickle.load(proc.stdout)
            except (OSError, EOFError, pickle.UnpicklingError):
                code = proc.poll()
                self._proc = None
                raise UploadFailed(f"the uploader process ended (exit code {code})") from None
        if kind == "error":
            raise UploadFailed(str(value))
        return int(value)

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            # Blocked from before the fork until the child ignores them: between the fork and its
            # setsid() the child is still in this group, and a group signal would kill it.
            old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "pretrain.storage.uploader"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    start_new_session=True,
                )  # fmt: skip
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return self._proc

    def close(self) -> None:
        with self._lock:
            if self._proc is None:
                return
            with contextlib.suppress(OSError):
                assert self._proc.stdin is not None
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def _child_setup() -> IO[bytes]:
    """In the uploader: signals ignored, gone with its parent, niced, logs in the trainer's
    format; returns the private reply channel."""
    from pretrain.proc import die_with_parent

    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent until now
    die_with_parent(signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.nice(10)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING, stream=sys.stderr, force=True,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )  # fmt: skip
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return replies


def serve() -> None:
    """The uploader's loop: publish each requested part until stdin closes."""
    replies = _child_setup()
    from pretrain.storage.location import Location
    from pretrain.storage.publish import publish_part

    requests = sys.stdin.buffer
    while True:
        try:
            where, staging, step, node_rank = pickle.load(requests)
        except EOFError:
            return
        try:
            reply: tuple[str, Any] = ("ok", publish_part(Location(where), staging, step, node_rank))
        except Exception as e:  # reported to the trainer, which counts and logs it
            reply = ("error", f"{e.__class__.__name__}: {e}")
        pickle.dump(reply, replies)
        replies.flush()


if __name__ == "__main__":
    serve()
