"""The images users pull, built here with podman (`make images`) and run as a cluster would:
as uid 1000, on a read-only root filesystem, with nothing writable but the volumes given."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.containers import PODMAN
from tests.images import Images

pytestmark = [pytest.mark.podman, pytest.mark.slow]

#: As a pod with readOnlyRootFilesystem: no writable /tmp, /var/tmp or /run either.
LOCKED = [*PODMAN, "run", "--rm", "--network=none", "--read-only", "--read-only-tmpfs=false", "--cap-drop=ALL",
          "--security-opt", "no-new-privileges"]  # fmt: skip


def run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def test_the_operator_image_has_no_torch_and_starts_as_non_root(images: Images) -> None:
    help_ = run([*LOCKED, images.operator, "operator", "--help"])
    assert help_.returncode == 0, help_.stderr
    assert "Run the PretrainJob operator" in help_.stdout
    probe = run([*LOCKED, "--entrypoint", "python3", images.operator, "-c",
                 "import os, importlib.util as u; print(os.getuid(), os.getgid(), u.find_spec('torch') is None, "
                 "u.find_spec('kopf') is not None)"])  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["1000", "1000", "True", "True"], "uid 1000, no torch, kopf installed"


def test_the_cpu_trainer_image_trains_and_exports_as_uid_1000_on_a_read_only_root(
    images: Images, tmp_path: Path
) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    workspace.chmod(0o777)  # as the kubelet makes an emptyDir
    sets = ["--set", "training.maxSteps=5", "--set", "monitoring.metricsPort=29871"]  # the command
    done = run([*LOCKED, "--user", "1000:1000", "-v", f"{workspace}:/workspace", images.trainer_cpu,
                "pretrain", "run", "/opt/pretrain/examples/tiny-cpu.yaml", *sets, "--output", "/workspace/run"],
               timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = workspace / "run" / "checkpoints" / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert (final / "model.safetensors").stat().st_uid == 1000, "written by uid 1000"
    assert "step 5/5" in done.stderr + done.stdout

    # and nothing outside the volumes is writable
    write = run([*LOCKED, "--user", "1000:1000", images.trainer_cpu, "sh", "-c", "echo x > /opt/venv/x"])
    assert write.returncode != 0 and "Read-only file system" in write.stderr
