"""A full disk (issue 16, item 7), for real: the checkpoint folder on a 1.9 MB tmpfs.

The mount needs a user and mount namespace (`unshare -rm`), so the three runs happen inside one
shell there and the test reads what they left. A 0.5 MB file fills part of the disk: the first
run saves step 2, then runs out of space in step 4's save; the second run, on a disk with 0 bytes
free, must make room for its lease by removing that unfinished save, resumes from step 2 and
fails at step 4 again; once the file is gone the third run finishes. With step 4's debris kept,
the third run would not fit (0.59 MB of debris + two checkpoints of 0.75 MB > 1.9 MB)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from tests.trainer_runs import command

pytestmark = pytest.mark.slow  # torchrun: not in `make test-fast`

SCRIPT = """
set -u
mount -t tmpfs -o size=1900k tmpfs "$CKPT" || exit 99
head -c 500000 /dev/urandom > "$CKPT/filler"
for i in 1 2 3; do
  [ $i = 3 ] && rm "$CKPT/filler"
  "$@" > "$OUT/r$i.out" 2> "$OUT/r$i.err"; echo $? > "$OUT/r$i.rc"
  (cd "$CKPT" && ls -d step-* */manifest.json 2>/dev/null) > "$OUT/after$i.ls"
done
"""


def test_a_full_disk_loses_nothing_and_the_rerun_cleans_up(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to mount a small tmpfs")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    ckpt.mkdir()
    out.mkdir()
    run = command(out / "run", ["checkpoint.keepLast=1", "checkpoint.intervalSteps=2", "training.maxSteps=8",
                                f"checkpoint.uri={ckpt}"], nproc=1)  # fmt: skip
    env = subprocess_env(out) | {"CKPT": str(ckpt), "OUT": str(out)}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", SCRIPT, "sh", *run], env=env, cwd=out, timeout=600,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode == 99:
        pytest.skip(f"this machine refuses an unprivileged tmpfs mount: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr[-2000:]
    rc = [int((out / f"r{i}.rc").read_text()) for i in (1, 2, 3)]
    err = [(out / f"r{i}.err").read_text() for i in (1, 2, 3)]
    after = [(out / f"after{i}.ls").read_text().split() for i in (1, 2, 3)]
    full = "error: cannot save checkpoint step-00000004: no space left on the disk holding"
    for i in (0, 1):
        assert rc[i] == 1, err[i][-3000:]
        last = err[i].strip().splitlines()[-1]
        assert last.startswith(full) and "run again: it resumes from the last complete checkpoint" in last, last
        assert "Traceback" not in err[i], "one line, not torchrun's report"
    assert after[0] == ["step-00000002", "step-00000002/manifest.json", "step-00000004"], "step 2 kept, 4 unfinished"
    launcher = (out / "run" / "work" / "launcher.log").read_text()
    assert "no room for the checkpoint lease" in launcher, "the second run found the disk full before anything"
    assert "removing step-00000004: an incomplete checkpoint" in err[1]
    assert "resumed from" in err[1] and "(step 2)" in err[1]
    assert rc[2] == 0, err[2][-3000:]
    assert "(step 2)" in err[2]
    assert after[2] == ["step-00000008", "step-00000008/manifest.json"]
