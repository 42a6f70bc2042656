"""The worker command line, shared by `pretrain run` and the operator's pods (torch-free)."""

from __future__ import annotations

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
