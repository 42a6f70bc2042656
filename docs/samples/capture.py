"""Capture the sample outputs the docs show, from real runs (run from the repository root):

    .venv/bin/python docs/samples/capture.py            # both
    .venv/bin/python docs/samples/capture.py cluster    # only the cluster session

- `cluster.txt`: a kubectl session against the Kubernetes API emulator of the tests, with the
  real `pretrain operator` process and the stand-in node running the pods as processes (see
  docs/operations.md, "What is verified without a cluster"): `kubectl apply`, `get ptj` while
  the job trains and after it succeeded, `get pods`, `describe ptj`.
- `client.txt`: the same with `pretrain submit`, `status`, `logs`, `wait` (pretrain.client).
- `demo.txt`: what `pretrain run examples/tiny-cpu.yaml` followed by `pretrain generate` prints.

Each file says when and how it was captured. tests/test_docs.py checks that every block marked
`<!-- sample: docs/samples/NAME -->` in the docs is made of lines of that file.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import boto3
import yaml
from moto.server import ThreadedMotoServer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.kubeapi.harness import Kubectl, OperatorProcess, start_apiserver, wait_for  # noqa: E402
from tests.kubelet import Kubelet  # noqa: E402
from tests.trainer_runs import free_port  # noqa: E402

OUT = ROOT / "docs" / "samples"
#: ANSI colour codes and the progress bar's carriage-return frames do not belong in a text file.
NOISE = re.compile(r"\x1b\[[0-9;]*m")


def header(what: str) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"# {what}\n# Captured by docs/samples/capture.py on {when}, {platform.node()} ({platform.machine()}).\n"


def cluster() -> None:
    with tempfile.TemporaryDirectory(prefix="pretrain-sample-") as tmp:
        root = Path(tmp)
        api = start_apiserver(root / "api")
        kubectl = Kubectl(api)
        operator = OperatorProcess(api, root / "operator.log", ["--progress-interval", "2"]).start()
        node = Kubelet(api.kubeconfig, root / "node").start()
        session: list[str] = []

        def run(*args: str, stdin: str | None = None) -> str:
            out = kubectl(*args, stdin=stdin).stdout
            shown = " ".join(args) + (" -f tiny-cpu.yaml" if stdin and "-f" not in args else "")
            session.append(f"$ kubectl {shown.replace(' -f -', ' -f tiny-cpu.yaml')}\n{out}")
            return out

        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        s3.start()
        host, port = s3.get_host_and_port()
        credentials = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        boto3.client("s3", endpoint_url=credentials["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="test", aws_secret_access_key="test").create_bucket(Bucket="ckpt")  # fmt: skip
        try:
            secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
                      "type": "Opaque", "stringData": credentials}  # fmt: skip
            kubectl("apply", "-f", "-", stdin=yaml.safe_dump(secret))
            doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
            doc["spec"]["resources"].update({"nodes": 2, "procsPerNode": 1})
            doc["spec"]["training"].update({"maxSteps": 200, "evalInterval": 100, "logInterval": 20})
            doc["spec"]["checkpoint"].update(
                {"uri": "s3://ckpt/tiny-cpu", "credentialsSecret": "s3-credentials", "intervalSteps": 100}
            )
            doc["spec"]["monitoring"] = {"metricsPort": free_port()}
            run("apply", "-f", "-", stdin=yaml.safe_dump(doc, sort_keys=False))
            job = lambda: (api.objects("pretrainjobs", "pretrain.io") or [{}])[0]  # noqa: E731

            def step(at_least: int) -> bool:
                status = job().get("status") or {}
                if status.get("phase") in ("Failed", "Invalid"):
                    raise SystemExit(f"the job failed: {status.get('message')}")
                return int((status.get("progress") or {}).get("step") or 0) >= at_least

            wait_for(lambda: step(60), 600, "step 60")
            run("get", "ptj")
            run("get", "pods", "-o", "wide")
            wait_for(lambda: (job().get("status") or {}).get("phase") in ("Succeeded", "Failed"), 900, "the end")
            time.sleep(3)
            run("get", "ptj")
            run("describe", "ptj", "tiny-cpu")
        finally:
            operator.stop()
            node.stop()
            api.stop()
            s3.stop()
    text = header(
        "A kubectl v1.35 session against the tests' Kubernetes API emulator, the real `pretrain operator`\n"
        "# process and the stand-in node (pods run as processes); examples/tiny-cpu.yaml with 2 nodes\n"
        "# of 1 process and 200 steps, checkpoints to an S3 protocol server (moto) on loopback."
    )
    (OUT / "cluster.txt").write_text(text + "\n" + "\n".join(session))


def top_screen(pretrain: str, env: dict[str, str]) -> str:
    """What `pretrain top` draws in a real terminal: a tmux pane, captured."""
    name = f"top-{os.getpid()}"
    command = f"env KUBECONFIG={env['KUBECONFIG']} {pretrain} top --interval 1"  # a running tmux server has its own env
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "120", "-y", "8", command], env=env, check=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # its first frame (the interpreter starts in a few seconds)
            time.sleep(1)
            shot = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True, check=True
            )
            if "NAME" in shot.stdout:
                break
        time.sleep(3)  # a few redraws on
        shot = subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True, check=True)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], check=False)
    return "\n".join(line.rstrip() for line in shot.stdout.splitlines() if line.strip()) + "\n"


def client() -> None:
    """`pretrain submit/status/logs/wait` (pretrain.client) against the emulator, as `cluster`."""
    with tempfile.TemporaryDirectory(prefix="pretrain-client-") as tmp:
        root = Path(tmp)
        api = start_apiserver(root / "api")
        operator = OperatorProcess(api, root / "operator.log", ["--progress-interval", "2"]).start()
        node = Kubelet(api.kubeconfig, root / "node").start()
        env = {**os.environ, "KUBECONFIG": str(api.kubeconfig)}
        pretrain = str(Path(sys.executable).parent / "pretrain")
        session: list[str] = []

        def run(*args: str, ok: bool = True) -> str:
            done = subprocess.run([pretrain, *args], cwd=root, env=env, capture_output=True, text=True, timeout=900)
            session.append(f"$ pretrain {' '.join(args)}\n{done.stdout}{done.stderr}")
            if ok and done.returncode != 0:
                raise SystemExit(f"pretrain {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
            return done.stdout

        try:
            doc = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
            doc["spec"]["resources"].update({"nodes": 1, "procsPerNode": 2})
            doc["spec"]["training"].update({"maxSteps": 100, "evalInterval": 50, "logInterval": 20})
            doc["spec"]["monitoring"] = {"metricsPort": free_port()}
            (root / "tiny-cpu.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
            run("submit", "tiny-cpu.yaml", "--set", "training.maxSteps=-5", ok=False)
            run("submit", "tiny-cpu.yaml")
            job = lambda: (api.objects("pretrainjobs", "pretrain.io") or [{}])[0].get("status") or {}  # noqa: E731
            wait_for(lambda: int((job().get("progress") or {}).get("step") or 0) >= 30, 600, "step 30")
            run("status", "tiny-cpu")
            session.append(
                f"$ pretrain top    # in tmux, 120x8; the screen 3 s after its first frame (tmux capture-pane)\n{top_screen(pretrain, env)}"
            )
            run("logs", "tiny-cpu", "--tail", "3")
            run("wait", "tiny-cpu", "--timeout", "900")
            run("status", "nope", ok=False)
        finally:
            operator.stop()
            node.stop()
            api.stop()
    text = header(
        "`pretrain submit/status/logs/wait` against the tests' Kubernetes API emulator, the real\n"
        "# `pretrain operator` process and the stand-in node; examples/tiny-cpu.yaml on 1 node of 2\n"
        "# processes, 100 steps, no checkpoint storage."
    )
    (OUT / "client.txt").write_text(text + "\n" + "\n".join(session))


def demo() -> None:
    with tempfile.TemporaryDirectory(prefix="pretrain-demo-") as tmp:
        out = Path(tmp) / "tiny-cpu"
        pretrain = str(Path(sys.executable).parent / "pretrain")
        runs = [
            [pretrain, "run", "examples/tiny-cpu.yaml", "--output", str(out)],
            [pretrain, "generate", "--model", str(out / "checkpoints" / "final"), "--prompt", "ROMEO:",
             "--max-new-tokens", "200", "--seed", "1"],
        ]  # fmt: skip
        lines: list[str] = []
        for argv in runs:
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800)
            shown = " ".join(a.replace(str(out), "runs/tiny-cpu") for a in argv[1:])
            lines.append(f"$ pretrain {shown}")
            text = NOISE.sub("", done.stdout + done.stderr).replace(str(out), "runs/tiny-cpu")
            lines += [ln for ln in text.splitlines() if "\r" not in ln]
            if done.returncode != 0:
                raise SystemExit(f"{argv} exited {done.returncode}:\n{text[-3000:]}")
    text = header("`pretrain run examples/tiny-cpu.yaml` and `pretrain generate`, as `make demo` runs them.")
    (OUT / "demo.txt").write_text(text + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    which = sys.argv[1:] or ["cluster", "client", "demo"]
    for name in which:
        {"cluster": cluster, "client": client, "demo": demo}[name]()
        print(f"wrote {OUT / (name + '.txt')}")
