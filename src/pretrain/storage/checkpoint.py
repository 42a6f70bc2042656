"""Checkpoints in any fsspec store: written locally, uploaded in the background, verified by a
manifest written last, pruned only after a newer checkpoint is complete.

Layout under `checkpoint.uri`::

    step-00000100/<DeepSpeed files>, loader.json, rng-rank-<r>.pt, job.json
    step-00000100/.parts/node-<k>.json   size and sha256 of the files node k wrote
    step-00000100/manifest.json          every file with size and sha256; written LAST
    step-00000100/universal/             the same state in DeepSpeed's universal format (made on
                                         the first resume at another world size or ZeRO stage),
                                         with its own manifest.json, written last
    final/                               the Hugging Face export
    quarantine/step-00000100-<time>/     a step whose manifest was there but damaged, moved
                                         aside with its files (never deleted by the store)

A directory without a complete manifest does not exist for readers. This module knows nothing
of DeepSpeed or torch: the trainer writes files into `staging_dir(step)` and calls `commit`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pretrain.storage.fs import FULL_ERRNOS, local_path, sha256_file, upload_dir
from pretrain.storage.lease import LEASE_FILE, CheckpointLease, LeaseError
from pretrain.storage.location import CheckpointError, Location, LocationArgs
from pretrain.storage.manifest import MANIFEST, Manifest, step_name
from pretrain.storage.paths import UnsafePath, inside, relative_name
from pretrain.storage.publish import background_priority, files_under, publish_part, staging_dir, write_manifest
from pretrain.storage.retention import resume_order, retention_plan
from pretrain.storage.uploader import UploaderProcess

__all__ = ["INTERACTIVE_ATTEMPTS", "QUARANTINE", "CheckpointError", "CheckpointStore", "SaveStats"]

log = logging.getLogger("pretrain.checkpoint")

#: Where steps with a damaged manifest are moved, under the checkpoint location.
QUARANTINE = "quarantine"


@dataclass
class SaveStats:
    """What the last saves did, for metrics and logs."""

    saves: int = 0
    failures: int = 0
    last_bytes: int = 0
    last_seconds: float = 0.0
    last_verified_step: int | None = None
    last_verified_time: float | None = None
    errors: list[str] = field(default_factory=list)


#: Tries of one storage call by an interactive command (`checkpoints list|verify`, `report`, the
#: pre-flight of `pretrain run`): a user waits about 1.5 s, not the minute a training run rides out.
INTERACTIVE_ATTEMPTS = 3


class CheckpointStore:
    """One job's checkpoints. Every method is called on every rank unless it says otherwise."""

    def __init__(
        self,
        uri: str,
        *,
        workdir: Path,
        node_rank: int = 0,
        nodes: int = 1,
        storage_options: dict[str, Any] | None = None,
        keep_last: int = 3,
        keep_every: int | None = None,
        retry_attempts: int = 8,
        retry_base_delay: float = 0.5,
        part_timeout: float = 3600.0,
        upload_process: bool = True,
    ) -> None:
        self.loc = Location(LocationArgs(uri, storage_options or {}, retry_attempts, retry_base_delay))
        # Hashing and uploading run in a separate, niced process, out of the stop signals' reach
        # (storage/uploader.py).
        self._uploader = UploaderProcess()
        self.upload_process = upload_process
        self.local, self.uri, self.options = self.loc.local, self.loc.uri, self.loc.options
        self.workdir = workdir
        self.node_rank, self.nodes = node_rank, nodes
        self.keep_last, self.keep_every = keep_last, keep_every
        self.part_timeout = part_timeout
        self.stats = SaveStats()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self._inflight: Future[None] | None = None
        self._lock = threading.Lock()
        self._lease: CheckpointLease | None = None

    @property
    def fs(self) -> Any:
        return self.loc.fs

    @property
    def root(self) -> str:
        """The location's path in its filesystem (the URI without its scheme)."""
        return self.loc.root

    def steps(self) -> list[int]:
        """Steps that have a directory (complete or not), ascending."""
        return self.loc.steps()

    def exists(self, rel: str) -> bool:
        return self.loc.exists(rel)

    def manifest_state(self, rel: str) -> tuple[str, Manifest | None, str]:
        """What is known of `<uri>/<rel>/manifest.json` (see `Location.manifest_state`)."""
        return self.loc.manifest_state(rel)

    # ------------------------------------------------------------------ the lease (one writer at a time)

    def acquire_lease(self, holder: str, *, duration: float | None = None, settle: float = 0.5) -> None:
        """Take this location's lease for `holder` and keep renewing it (global rank 0, before
        anything is read or written here), or raise CheckpointError naming who holds it."""
        lease = CheckpointLease(
            self.fs, self.loc.join(LEASE_FILE), holder, exclusive_create=self.loc.create_exclusive, duration=duration,
            settle=settle,
        )  # fmt: skip
        try:
            try:
                self.loc.retry("take the checkpoint lease", lease.acquire)
            except OSError as e:
                # A full disk cannot take even the lease, and the debris of the save that filled
                # it is what a rerun must remove. The lease was free when the write failed (it is
                # checked first), so that debris is nobody's save in flight.
                if e.errno not in FULL_ERRNOS:
                    raise
                log.warning("no room for the checkpoint lease in %s: removing unfinished saves first", self.uri)
                if not self.discard_incomplete():
                    raise
                lease.acquire()
        except LeaseError as e:
            raise CheckpointError(
                f"checkpoint.uri {self.uri} is in use by another run: {e}; two runs must not share a checkpoint "
                "folder (give this one its own checkpoint.uri, or stop the other)"
            ) from None
        lease.start()
        self._lease = lease

    def lease_problem(self) -> str | None:
        """Why this run may no longer publish here (its lease was lost), or None."""
        return self._lease.problem() if self._lease is not None else None

    def _check_lease(self) -> None:
        if self._lease is not None:
            try:
                self._lease.check()
            except LeaseError as e:
                raise CheckpointError(str(e)) from None

    def release_lease(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    # ------------------------------------------------------------------ saving

    def staging_dir(self, step: int) -> Path:
        """Where this node's ranks write checkpoint `step` (the final place for local URIs)."""
        return staging_dir(self.loc, self.workdir, step)

    def wait(self) -> None:
        """Block until the upload in flight (if any) is done. Call before the next save."""
        if self._inflight is not None:
            with contextlib.suppress(Exception):  # failures are recorded in stats
                self._inflight.result()
            self._inflight = None

    def commit(
        self, step: int, *, writes_manifest: bool, uploads: bool, meta: dict[str, Any], background: bool = True
    ) -> None:
        """After this node's ranks wrote `staging_dir(step)`: hash (and upload) its files, publish
        this node's part, and on the manifest writer (global rank 0) the manifest and retention.

        `uploads` is true on one process per node (local rank 0); others only return.
        """
        if not uploads:
            return
        self.wait()
        job = self._pool.submit(self._commit, step, writes_manifest, meta)
        self._inflight = job
        if not background:
            self.wait()

    def _commit(self, step: int, writes_manifest: bool, meta: dict[str, Any]) -> None:
        background_priority()
        t0 = time.monotonic()
        try:
            staging = self.staging_dir(step)
            if self.upload_process:
                nbytes = self._uploader.publish(self.loc.args, staging, step, self.node_rank)
            else:
                nbytes = publish_part(self.loc, staging, step, self.node_rank)
            if writes_manifest:
                self._check_lease()  # the manifest is the commit: never one after the lease was lost
                write_manifest(self.loc, step, self.nodes, self.part_timeout, meta)
                self._retain()
            with self._lock:
                self.stats.saves += 1
                self.stats.last_bytes = nbytes
                self.stats.last_seconds = time.monotonic() - t0
                if writes_manifest:
                    self.stats.last_verified_step = step
                    self.stats.last_verified_time = time.time()
            log.info("checkpoint %s committed (%.1f MB in %.1fs)", step_name(step), nbytes / 1e6, time.monotonic() - t0)
        except Exception as e:
            with self._lock:
                self.stats.failures += 1
                self.stats.errors.append(f"{step_name(step)}: {e.__class__.__name__}: {e}")
            log.error("checkpoint %s failed: %s: %s", step_name(step), e.__class__.__name__, e)
            raise

    # ------------------------------------------------------------------ reading

    def manifest(self, step: int) -> Manifest | None:
        """The manifest of `step`, or None when it has none (incomplete) or it is damaged."""
        return self.folder_manifest(step_name(step))

    def folder_manifest(self, rel: str) -> Manifest | None:
        """The manifest of the folder `<uri>/<rel>` (a step, or a step's universal form), or
        None when it is absent or damaged; raises CheckpointError when it cannot be read."""
        return self.manifest_state(rel)[1]

    def complete_steps(self) -> list[int]:
        return [s for s in self.steps() if self.manifest_state(step_name(s))[0] == "complete"]

    def verify(self, step: int, into: Path | None = None) -> str | None:
        """None when every file of `step` matches its manifest, else what is wrong. With `into`,
        the files are also copied there (downloaded for remote stores) as they are checked."""
        return self.verify_folder(step_name(step), into, what=f"step {step}")

    def verify_folder(self, rel: str, into: Path | None = None, *, what: str | None = None) -> str | None:
        """`verify` for any folder published with a manifest (`commit` or `publish_folder`)."""
        what = what or rel
        m = self.folder_manifest(rel)
        if m is None:
            return "no complete manifest"
        base = self.loc.join(rel)
        for rel_file, want in sorted(m["files"].items()):
            try:
                relative_name(rel_file, f"{what}: manifest entry")
            except UnsafePath as e:
                return str(e)
            src = f"{base}/{rel_file}"
            try:
                if into is not None:
                    dest = inside(into, rel_file, f"{what}: manifest entry")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    if not (self.local and dest.resolve() == local_path(src).resolve()):
                        self.loc.retry(f"download {rel_file}", functools.partial(self.fs.get_file, src, str(dest)))
                    size, digest = dest.stat().st_size, sha256_file(dest)
                elif self.local:
                    p = local_path(src) if src.startswith("file://") else Path(src)
                    size, digest = p.stat().st_size, sha256_file(p)
                else:
                    data = self.loc.retry(f"read {rel_file}", functools.partial(self.fs.cat_file, src))
                    size, digest = len(data), hashlib.sha256(data).hexdigest()
            except FileNotFoundError:
                return f"{rel_file} is missing"
            if not isinstance(want, dict) or size != want.get("size"):
                return (
                    f"{rel_file} has {size} bytes, manifest says {want.get('size') if isinstance(want, dict) else want}"
                )
            if digest != want.get("sha256"):
                return f"{rel_file} fails its sha256 check"
        return None

    def publish_folder(self, local_dir: Path, rel: str, meta: dict[str, Any]) -> int:
        """Publish a finished local folder as `<uri>/<rel>` with a manifest of its files (size
        and sha256) written into it and copied last, under the lease. Global rank 0 only.
        Returns the bytes published."""
        files: dict[str, dict[str, Any]] = {
            p.relative_to(local_dir).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in files_under(local_dir)
        }
        self._check_lease()  # the fence where the folder is its own destination (nothing is copied)
        manifest = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "files": files, **meta}
        (local_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
        upload_dir(local_dir, f"{self.uri}/{rel}", self.options, last=MANIFEST, before_last=self._check_lease,
                   retry=self.loc.retry)  # fmt: skip
        return sum(int(f["size"]) for f in files.values())

    def remove_folder(self, rel: str) -> None:
        """Delete `<uri>/<rel>` (an unfinished derived folder) if it is there."""
        with contextlib.suppress(FileNotFoundError):
            if self.fs.exists(self.loc.join(rel)):
                self.loc.delete(rel)

    def local_copy(self, step: int) -> Path:
        """Where `step`'s files are (local stores) or will be downloaded to (remote)."""
        return self.staging_dir(step) if self.local else self.workdir / "restore" / step_name(step)

    def select(self, resume: int | str) -> tuple[int | None, list[str]]:
        """The step to resume from and the notes on newer checkpoints skipped. Downloads (and
        verifies) the chosen checkpoint into `local_copy(step)`. Called on one process per node."""
        notes: list[str] = []
        candidates = resume_order(self.steps(), resume)
        if candidates is None:
            raise CheckpointError(f"checkpoint.resume: no checkpoint at step {resume} in {self.uri}")
        for step in candidates:
            problem = self.verify(step, into=self.local_copy(step))
            if problem is None:
                return step, notes
            notes.append(f"{step_name(step)} is unusable ({problem})")
            if not self.local:
                shutil.rmtree(self.local_copy(step), ignore_errors=True)
        if isinstance(resume, int):
            raise CheckpointError(f"checkpoint.resume: {notes[-1]}")
        return None, notes

    def start_policy(self, resume: int | str) -> tuple[int | None, list[str]]:
        """Where a run starts, with the rules that keep one run's checkpoints from another's:

        - debris of a crashed save (a step without manifest) is removed first; it is nobody's
          checkpoint, and on a full disk it is what makes every rerun fail;
        - `resume: never` needs an empty location: a fresh run beside an earlier run's
          checkpoints would overwrite that run's steps, tokenizer and export, and its retention
          would delete them; nothing is deleted, the run stops with the reason;
        - when checkpoints exist and every one fails verification, the run stops too (loudly,
          nothing loaded or deleted) instead of training from step 0 over them.
        Called on rank 0 before anything is written."""
        self.discard_incomplete()
        complete = self.complete_steps()
        if resume == "never":
            if complete:
                shown = ", ".join(str(s) for s in complete[-5:])
                raise CheckpointError(
                    f"checkpoint.resume is never, but {self.uri} holds checkpoints of an earlier run (steps {shown}): "
                    "a fresh start needs an empty checkpoint.uri; nothing was deleted"
                )
            return None, []
        step, notes = self.select(resume)
        if step is None and notes:
            raise CheckpointError(
                f"every checkpoint in {self.uri} fails verification ({'; '.join(notes[:3])}): nothing was loaded "
                "or deleted; move them away to start fresh"
            )
        return step, notes

    def discard_incomplete(self) -> list[int]:
        """Delete the step folders proven to have no manifest: a NotFound on the manifest, then a
        listing of the folder without it (the debris of a save that did not finish). A step whose
        manifest is there but damaged is quarantined, not deleted with its weights; a failed
        read stops this with CheckpointError before anything is deleted. Only safe while no
        save is in flight."""
        gone = []
        for s in self.steps():
            state, _, why = self.manifest_state(step_name(s))
            if state == "damaged":
                self.quarantine(s, why)
            elif state == "absent" and MANIFEST not in self.loc.retry(
                "list", functools.partial(self.loc.ls, self.loc.join(step_name(s)))
            ):
                log.warning("removing %s: an incomplete checkpoint (a save that did not finish)", step_name(s))
                self.loc.delete(step_name(s))
                gone.append(s)
        return gone

    def quarantine(self, step: int, why: str) -> str:
        """Move a step whose manifest is damaged to `<uri>/quarantine/` (out of every reader's
        and retention's sight, its files kept for a person to inspect); returns where."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        dest = f"{QUARANTINE}/{step_name(step)}-{stamp}"
        if self.local:
            target = local_path(self.uri) / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(local_path(self.uri) / step_name(step), target)
        else:
            src, dst = self.loc.join(step_name(step)), self.loc.join(dest)
            self.loc.retry("quarantine", functools.partial(self.fs.copy, src, dst, recursive=True))
            self.loc.delete(step_name(step))
        log.warning("%s is damaged (%s): moved to %s/%s, nothing deleted", step_name(step), why, self.uri, dest)
        return dest

    # ------------------------------------------------------------------ retention

    def _retain(self) -> None:
        """Keep the newest `keep_last` complete steps (and every `keep_every`-th); delete older
        complete steps and older debris. Damaged steps are quarantined; a storage error skips
        retention this time (the next save tries again) rather than deciding on a failed read."""
        try:
            states = {s: self.manifest_state(step_name(s)) for s in self.steps()}
        except CheckpointError as e:
            log.warning("retention skipped: %s", e)
            return
        delete, quarantine = retention_plan({s: state for s, (state, _, _) in states.items()}, self.keep_last,
                                            self.keep_every)  # fmt: skip
        for s in quarantine:
            self.quarantine(s, states[s][2])
        for s in delete:
            log.info("retention: deleting %s", step_name(s))
            self.loc.delete(step_name(s))

    # ------------------------------------------------------------------ exports

    def upload_dir(self, local_dir: Path, name: str) -> str:
        """Copy a finished directory (the export, the tokenizer) to `<uri>/<name>`; returns its URI."""
        uri = f"{self.uri}/{name}"
        self._check_lease()
        upload_dir(local_dir, uri, self.options)
        return uri

    def close(self) -> None:
        self.wait()
        self._pool.shutdown(wait=True)
        self._uploader.close()
