"""The images users pull, built here with podman (`make images`) and run as a cluster would:
as uid 1000, on a read-only root filesystem, with nothing writable but the volumes given."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.containers import PODMAN
from tests.images import Images
from tests.kubeapi.harness import Kubectl, start_apiserver, wait_for
from tests.trainer_runs import TINY, free_port

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


def test_the_operator_image_reconciles_a_job(images: Images, tmp_path: Path) -> None:
    """The operator as its image runs it (not the development venv): against the API emulator,
    through a kubeconfig, it creates a job's Service, ConfigMap and pods."""
    api = start_apiserver(tmp_path / "api")
    name = f"operator-image-{free_port()}"
    try:
        api.kubeconfig.chmod(0o644)
        doc = yaml.safe_load(TINY.read_text())
        Kubectl(api)("apply", "-f", "-", stdin=yaml.safe_dump(doc))
        proc = subprocess.Popen(
            [*PODMAN, "run", "--rm", "--name", name, "--network=host", "--read-only", "--read-only-tmpfs=false",
             "--cap-drop=ALL", "--security-opt", "no-new-privileges", "-v", f"{api.kubeconfig}:/kubeconfig:ro",
             "-e", "KUBECONFIG=/kubeconfig", images.operator, "operator", "--namespace", "default",
             "--health-port", str(free_port()), "--metrics-port", str(free_port())],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            pods = wait_for(lambda: [p["metadata"]["name"] for p in api.objects("pods")], 120, "the job's pods",
                            lambda: proc.stdout.read() if proc.poll() is not None and proc.stdout else "")  # fmt: skip
            assert pods == ["tiny-cpu-a1-n0"]
            assert [s["metadata"]["name"] for s in api.objects("services")] == ["tiny-cpu"]
        finally:
            subprocess.run([*PODMAN, "stop", "--time", "10", name], capture_output=True, timeout=60)
            proc.wait(60)
        assert proc.returncode in (0, 143), proc.stdout.read() if proc.stdout else ""
    finally:
        api.stop()
