"""A lease on a checkpoint location: one run writes a checkpoint folder at a time.

A file lock guards a local run folder, but two runs on two machines (two clusters, a laptop and
a pod) can name the same bucket prefix. Without a guard their saves interleave: one run's
retention deletes the other's steps, a manifest lists weights of one run beside optimizer state
of the other, and `start_policy` removes the other's save in flight as debris.

The lease is one small object, `<checkpoint.uri>/.pretrain-lease.json`, shaped like a
Kubernetes Lease: the holder (the job's identity, stable across restarts of the same job, so a
restarted pod takes its own lease over at once), a per-process instance id, and a renew time.
Global rank 0 creates it before touching the folder (an exclusive create where the store has one:
If-None-Match on S3, link() of a finished file on a disk), renews it from a thread, checks it before every
manifest it publishes, and deletes it on every exit path it controls. A run killed with -9
leaves it behind; another job may take it once it has not been renewed for its duration
(judged by the reader's wall clock: the hosts' clocks are assumed to agree within seconds).

The lease lies beside the step folders, never inside one, so no copy of a checkpoint, an export
or a tokenizer carries it along.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("pretrain.storage")

LEASE_FILE = ".pretrain-lease.json"
#: Seconds a lease stays valid without renewal; `PRETRAIN_CHECKPOINT_LEASE_SECONDS` overrides it.
DEFAULT_DURATION = 60.0
#: A lease file is a few hundred bytes; a larger one is not read past this.
MAX_LEASE_BYTES = 64 * 1024


class LeaseError(RuntimeError):
    """The checkpoint location is held by another run, or this run lost it."""


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    instance: str
    renew_time: float
    duration: float
    acquire_time: float
    host: str
    pid: int

    def expired(self, now: float) -> bool:
        return now - self.renew_time > self.duration

    def to_bytes(self) -> bytes:
        shown = {"renewTimeISO": datetime.fromtimestamp(self.renew_time, UTC).isoformat(timespec="seconds")}
        return json.dumps({**asdict(self), **shown}, indent=1).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None when the bytes are not one (treated as no lease)."""
        try:
            raw = json.loads(data)
            return cls(
                holder=str(raw["holder"]), instance=str(raw["instance"]), renew_time=float(raw["renew_time"]),
                duration=float(raw["duration"]), acquire_time=float(raw["acquire_time"]), host=str(raw["host"]),
                pid=int(raw["pid"]),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None


def held_by_other(record: LeaseRecord | None, holder: str, now: float) -> str | None:
    """Why `holder` may not take the lease now, or None when it may (free, its own, expired).

    A renew time further in the future than the duration is not trusted: such a record would
    otherwise block the folder forever."""
    if record is None or record.holder == holder or record.expired(now):
        return None
    if record.renew_time - now > record.duration:
        return None
    left = record.duration - (now - record.renew_time)
    return (
        f"held by {record.holder} (host {record.host}, pid {record.pid}), renewed {max(0.0, now - record.renew_time):.0f}s "
        f"ago; it expires in {left:.0f}s unless renewed"
    )


def default_duration() -> float:
    raw = os.environ.get("PRETRAIN_CHECKPOINT_LEASE_SECONDS")
    try:
        value = float(raw) if raw else DEFAULT_DURATION
    except ValueError:
        value = DEFAULT_DURATION
    return min(max(value, 1.0), 3600.0)


class CheckpointLease:
    """Acquire, renew from a thread, check, release. `fs` is an fsspec filesystem; `path` the
    lease object's path in it. `exclusive_create(path, data)` writes only when nothing is there
    (raising FileExistsError otherwise)."""

    def __init__(
        self,
        fs: Any,
        path: str,
        holder: str,
        *,
        exclusive_create: Callable[[str, bytes], None],
        duration: float | None = None,
        settle: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fs, self.path, self.holder = fs, path, holder
        self._exclusive_create = exclusive_create
        self.duration = duration if duration is not None else default_duration()
        self.settle, self.clock = settle, clock
        self.instance = uuid.uuid4().hex
        self._acquired_at = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()

    # ------------------------------------------------------------------ I/O

    def _read_bytes(self) -> bytes | None:
        self.fs.invalidate_cache(self.path)
        try:
            return bytes(self.fs.cat_file(self.path, start=0, end=MAX_LEASE_BYTES))
        except FileNotFoundError:
            return None

    def read(self) -> LeaseRecord | None:
        """The current record; None when there is none or it is not one (empty, garbage)."""
        data = self._read_bytes()
        return None if data is None else LeaseRecord.parse(data)

    def _record(self) -> LeaseRecord:
        now = self.clock()
        return LeaseRecord(
            holder=self.holder, instance=self.instance, renew_time=now, duration=self.duration,
            acquire_time=self._acquired_at or now, host=socket.gethostname(), pid=os.getpid(),
        )  # fmt: skip

    # ------------------------------------------------------------------ protocol

    def acquire(self) -> None:
        """Take the lease or raise LeaseError saying who holds it."""
        with self._io:
            raw = self._read_bytes()
            current = None if raw is None else LeaseRecord.parse(raw)
            reason = held_by_other(current, self.holder, self.clock())
            if reason:
                raise LeaseError(reason)
            self._acquired_at = self.clock()
            if raw is None:
                try:
                    self._exclusive_create(self.path, self._record().to_bytes())
                except FileExistsError:
                    pass  # another run created it between our read and write: the read-back decides
                else:
                    return self._confirm(settle=False)
            else:
                if current is None:
                    log.warning("replacing an unreadable checkpoint lease file %s", self.path)
                elif current.holder != self.holder:
                    log.warning("taking over an expired checkpoint lease of %s", current.holder)
                self.fs.pipe_file(self.path, self._record().to_bytes())
            self._confirm(settle=True)

    def _confirm(self, *, settle: bool) -> None:
        """Read the lease back (after a pause where two runs may have overwritten each other)."""
        if settle and self.settle:
            time.sleep(self.settle)
        back = self.read()
        if back is None or back.instance != self.instance:
            reason = held_by_other(back, "", self.clock()) or "taken by another run at the same moment"
            raise LeaseError(reason)

    def renew(self) -> None:
        """Renew the lease if it is still ours; else remember that it was lost."""
        with self._io:
            if self._lost:
                return
            current = self.read()
            if current is None or current.instance != self.instance:
                who = current.holder if current else "nobody (the lease file was deleted)"
                self._lost = f"this run lost the checkpoint lease: it is now held by {who}"
                log.error("%s; no further checkpoint will be published", self._lost)
                return
            self.fs.pipe_file(self.path, self._record().to_bytes())

    def start(self) -> None:
        """Renew every third of the duration from a daemon thread, until `release`."""
        self._thread = threading.Thread(target=self._renew_loop, name="ckpt-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.duration / 3):
            try:
                self.renew()
            except Exception as e:  # a store outage: try again at the next tick
                log.warning("checkpoint lease renewal failed (%s: %s); retrying", e.__class__.__name__, e)

    def problem(self) -> str | None:
        """Why this run may not publish (the lease was lost), or None."""
        return self._lost

    def check(self) -> None:
        if self._lost:
            raise LeaseError(self._lost)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours. Never raises: it runs on
        exit paths, and a lease left behind only expires."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with self._io:
                current = self.read()
                if current is not None and current.instance == self.instance:
                    self.fs.rm_file(self.path)
        except Exception as e:
            log.warning("could not release the checkpoint lease (%s: %s); it expires on its own", type(e).__name__, e)
