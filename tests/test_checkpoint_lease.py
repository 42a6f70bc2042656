"""One writer per checkpoint location (issue 16, item 6 for remote URIs): the lease.

Two runs with different identities on one local folder and on one S3 prefix (a real S3
protocol server), a restart of the same job, a run killed without releasing, a lost lease that
stops the next manifest, and racing creators of which exactly one wins."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pretrain.storage.checkpoint import CheckpointError, CheckpointStore
from pretrain.storage.lease import LEASE_FILE, CheckpointLease, LeaseError, LeaseRecord, held_by_other
from pretrain.storage.manifest import step_name
from tests.s3server import S3
from tests.test_checkpoint_store import save, write_fake


def record(holder: str, renew: float, duration: float = 10.0) -> LeaseRecord:
    return LeaseRecord(holder=holder, instance="i", renew_time=renew, duration=duration, acquire_time=renew,
                       host="h", pid=1)  # fmt: skip


def test_who_may_take_the_lease() -> None:
    now = 1000.0
    assert held_by_other(None, "a", now) is None, "free"
    assert held_by_other(record("a", now - 1), "a", now) is None, "its own (a restart of the same job)"
    assert held_by_other(record("b", now - 11), "a", now) is None, "expired"
    reason = held_by_other(record("b", now - 4), "a", now)
    assert reason is not None and "held by b" in reason and "expires in 6s" in reason
    assert held_by_other(record("b", now + 10_000), "a", now) is None, "a renew time far in the future is not trusted"
    assert LeaseRecord.parse(b"{not json") is None
    assert LeaseRecord.parse(json.dumps({"holder": "x"}).encode()) is None


def stores(kind: str, tmp_path: Path, s3: S3 | None) -> tuple[CheckpointStore, CheckpointStore, str]:
    if kind == "local":
        uri = str(tmp_path / "ckpt")
    else:
        assert s3 is not None
        uri = f"s3://{s3.bucket(f'lease-{int(time.time() * 1e6)}')}/job"
    a = CheckpointStore(uri, workdir=tmp_path / "wa", upload_process=False)
    b = CheckpointStore(uri, workdir=tmp_path / "wb", upload_process=False)
    return a, b, uri


@pytest.fixture(params=["local", "s3"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[CheckpointStore, CheckpointStore, str]:
    s3 = request.getfixturevalue("s3") if request.param == "s3" else None
    return stores(request.param, tmp_path, s3)


def test_a_second_run_is_refused_while_the_first_holds_the_lease(
    pair: tuple[CheckpointStore, CheckpointStore, str],
) -> None:
    a, b, uri = pair
    a.acquire_lease("job ns/a (uid 1)", settle=0)
    save(a, 2)
    with pytest.raises(CheckpointError) as refused:
        b.acquire_lease("job ns/b (uid 2)", settle=0)
    message = str(refused.value)
    assert f"checkpoint.uri {a.uri} is in use by another run: held by job ns/a (uid 1)" in message
    assert "\n" not in message
    assert a.complete_steps() == [2], "the refused run touched nothing"
    assert a.steps() == [2], "the lease file is not a step"

    # the same job restarted (a new process, the old one killed) takes its lease over at once
    again = CheckpointStore(uri, workdir=a.workdir, upload_process=False)
    again.acquire_lease("job ns/a (uid 1)", settle=0)
    save(again, 4)
    assert again.complete_steps() == [2, 4]
    again.release_lease()
    assert not again.exists(LEASE_FILE), "a clean exit deletes the lease"
    b.acquire_lease("job ns/b (uid 2)", settle=0)
    b.release_lease()
    a.release_lease()  # the old instance releases nothing it no longer holds
    for s in (a, b, again):
        s.close()


def test_a_killed_runs_lease_expires_and_the_loser_publishes_nothing(
    pair: tuple[CheckpointStore, CheckpointStore, str],
) -> None:
    a, b, _ = pair
    a.acquire_lease("run a", duration=1.5, settle=0)
    save(a, 2)
    a._lease._stop.set()  # type: ignore[union-attr]  # renewals stop, as after kill -9 (or a long stall)
    with pytest.raises(CheckpointError, match="held by run a"):
        b.acquire_lease("run b", duration=30, settle=0)
    time.sleep(1.8)
    b.acquire_lease("run b", duration=30, settle=0)  # expired: taken over
    save(b, 4)

    # the stalled run wakes up: its next renewal finds the lease lost, its next manifest is refused
    a._lease.renew()  # type: ignore[union-attr]
    assert a.lease_problem() == "this run lost the checkpoint lease: it is now held by run b"
    write_fake(a, 6)
    a.commit(6, writes_manifest=True, uploads=True, meta={}, background=False)
    assert a.stats.failures == 1 and "lost the checkpoint lease" in a.stats.errors[-1]
    assert b.complete_steps() == [2, 4], "no manifest from the run that lost the lease"
    with pytest.raises(CheckpointError, match="lost the checkpoint lease"):
        a.upload_dir(a.workdir, "final")
    a.release_lease()
    assert b.exists(LEASE_FILE), "the loser does not delete the winner's lease"
    b.release_lease()
    a.close()
    b.close()


@pytest.mark.parametrize("round_", range(4))
def test_racing_creators_exactly_one_wins(pair: tuple[CheckpointStore, CheckpointStore, str], round_: int) -> None:
    """Six runs create the lease at once (a fresh one: no settle pause saves a creator that is
    not exclusive, nor a reader that sees another's file half-written)."""
    a, b, uri = pair
    contenders = [a, b] + [
        CheckpointStore(uri, workdir=a.workdir.parent / f"w{i}", upload_process=False) for i in range(4)
    ]
    barrier = threading.Barrier(len(contenders))
    won: list[int] = []
    lost: list[str] = []

    def contend(i: int, store: CheckpointStore) -> None:
        barrier.wait()
        try:
            store.acquire_lease(f"run {i}", settle=0.3)
            won.append(i)
        except CheckpointError as e:
            lost.append(str(e))

    threads = [threading.Thread(target=contend, args=(i, s)) for i, s in enumerate(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1, (won, lost)
    assert len(lost) == len(contenders) - 1 and all("is in use by another run" in m for m in lost)
    for s in contenders:
        s.release_lease()
        s.close()


def test_copies_of_a_checkpoint_do_not_carry_the_lease(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"), workdir=tmp_path / "w", upload_process=False)
    store.acquire_lease("run a", settle=0)
    save(store, 2)
    assert (tmp_path / "ckpt" / LEASE_FILE).exists()
    assert not list((tmp_path / "ckpt" / step_name(2)).rglob(LEASE_FILE))
    store.release_lease()
    store.close()


def test_a_lease_file_that_is_garbage_or_huge_is_not_trusted(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("file")
    path = str(tmp_path / LEASE_FILE)
    (tmp_path / LEASE_FILE).write_bytes(b"x" * (1 << 20))
    lease = CheckpointLease(fs, path, "run a", exclusive_create=lambda p, d: Path(p).write_bytes(d), settle=0)
    assert lease.read() is None
    lease.acquire()
    assert lease.read() is not None and lease.read().holder == "run a"  # type: ignore[union-attr]
    other = CheckpointLease(fs, path, "run b", exclusive_create=lambda p, d: Path(p).write_bytes(d), settle=0)
    with pytest.raises(LeaseError):
        other.acquire()
    lease.release()
    assert not (tmp_path / LEASE_FILE).exists()
