"""The contract between the operator and the trainer, named once: what a pod's environment,
paths and ports are, the command lines the operator puts in its pods, and the format of the
termination message a finished trainer leaves. The operator and the trainer both import this
module, and neither imports the other (metric names, the other thing they share, are in
`pretrain.metrics.names`). Torch-free.
"""

from __future__ import annotations

import json
from typing import Any

# ---- the pod's environment, as the operator sets it (children.build_pod) and the trainer reads it
#: torchrun's --node-rank of this pod.
ENV_NODE_RANK = "NODE_RANK"
#: Node 0's DNS name (<pod>.<service>.<namespace>.svc), the static rendezvous address.
ENV_MASTER_ADDR = "PRETRAIN_MASTER_ADDR"
ENV_JOB_NAME = "PRETRAIN_JOB_NAME"
#: The PretrainJob's uid: every attempt of one job may take over its checkpoint lease.
ENV_JOB_UID = "PRETRAIN_JOB_UID"
ENV_ATTEMPT = "PRETRAIN_ATTEMPT"
#: The pod's terminationGracePeriodSeconds: the trainer warns when a save on SIGTERM came close.
ENV_TERMINATION_GRACE = "PRETRAIN_TERMINATION_GRACE_SECONDS"
ENV_WORKDIR = "PRETRAIN_WORKDIR"
#: The address the metrics endpoint binds (tests give each stand-in pod its own loopback address).
ENV_METRICS_HOST = "PRETRAIN_METRICS_HOST"
#: Where the termination message goes when not /dev/termination-log (`pretrain run`, tests).
ENV_TERMINATION_LOG = "PRETRAIN_TERMINATION_LOG"
#: torchrun's grace for its workers after SIGTERM.
ENV_ELASTIC_SHUTDOWN = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
#: Every variable the operator sets in a trainer pod: a user's value (resources.env) would break it.
POD_ENV = (ENV_NODE_RANK, ENV_MASTER_ADDR, ENV_JOB_NAME, ENV_JOB_UID, ENV_ATTEMPT, ENV_TERMINATION_GRACE,
           ENV_WORKDIR, ENV_ELASTIC_SHUTDOWN)  # fmt: skip


def pod_name(job: str, attempt: int, rank: int) -> str:
    """The trainer pod of node `rank` in attempt `attempt` (the operator names it; clients find
    rank 0's log by it)."""
    return f"{job}-a{attempt}-n{rank}"


#: Port of node 0's torchrun rendezvous inside a job.
RENDEZVOUS_PORT = 29500
#: Where the operator mounts the job's ConfigMap.
POD_CONFIG_PATH = "/etc/pretrain/job.json"
#: Node-local scratch in a pod (an emptyDir).
POD_WORKDIR = "/workspace"


def trainer_command(
    *,
    nnodes: int,
    nproc_per_node: int,
    node_rank: int | str,
    master_addr: str,
    master_port: int = RENDEZVOUS_PORT,
    config: str = POD_CONFIG_PATH,
    workdir: str = POD_WORKDIR,
) -> list[str]:
    """`torchrun` with static rendezvous on node 0, running `python -m pretrain.trainer`.

    `node_rank` may be a shell-expanded reference such as ``$(NODE_RANK)`` (Kubernetes expands
    ``$(VAR)`` in container args from the pod's env).
    """
    return [
        "torchrun",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        f"--node-rank={node_rank}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
        "--max-restarts=0",  # the operator restarts the whole gang; torchrun must not restart alone
        "-m",
        "pretrain.trainer",
        f"--config={config}",
        f"--workdir={workdir}",
    ]


def prepare_command(*, index: str, count: int, config: str = POD_CONFIG_PATH, output: str = "/tmp/data") -> list[str]:
    """One worker of the data preparation stage (`index` may be ``$(JOB_COMPLETION_INDEX)``)."""
    return ["pretrain", "data", "prepare", config, f"--index={index}", f"--count={count}", f"--output={output}"]


# ---- the termination message
#: The key of a finished run's summary: `{"pretrainDone": {...}}` on one line.
DONE_KEY = "pretrainDone"


def parse_done(message: str, key: str = DONE_KEY) -> dict[str, Any] | None:
    """The summary under `key` in a termination message, or None (a failure's reason, garbage,
    too long)."""
    text = message.strip()
    if not text.startswith("{") or len(text) > 4096:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    done = doc.get(key) if isinstance(doc, dict) else None
    return done if isinstance(done, dict) else None


#: The key of a preparation worker's summary: `{"pretrainPrepared": {"units", "documents", "tokens"}}`.
PREPARED_KEY = "pretrainPrepared"


def parse_prepared(message: str) -> dict[str, int] | None:
    """A preparation worker's summary in its termination message, or None."""
    found = parse_done(message, PREPARED_KEY)
    if found is None:
        return None
    return {k: int(v) for k, v in found.items() if k in ("units", "documents", "tokens") and isinstance(v, int)}


# ---- a stalled trainer (its watchdog fired): how it ends, and how the operator recognises it
#: The exit status of a worker whose watchdog fired (torchrun, PID 1, exits 1 whatever the worker's).
STALLED_EXIT = 3
#: The first word of a stalled worker's termination message; the operator's failure reason.
STALLED = "Stalled"


def stalled_message(reason: str, stacks: str, limit: int = 4096) -> str:
    """A stalled worker's termination message: `Stalled: <reason>` on the first line (what the
    job's condition shows), then as much of its threads' stacks as Kubernetes keeps (4 KiB),
    innermost frames first."""
    head = f"{STALLED}: {reason.strip().splitlines()[0]}"[:1000]
    room = limit - len(head.encode()) - 1
    tail = stacks.strip().encode()[:room].decode(errors="ignore") if room > 0 else ""
    return f"{head}\n{tail}" if tail else head


def is_stalled(message: str) -> bool:
    return message.startswith(f"{STALLED}: ")
