"""Where this process sits in the job, and the few collectives the trainer needs besides
DeepSpeed's.

Ranks come from torchrun's environment. With one process and no process group every
collective is a plain call, so the trainer's parts (checkpointer, evaluator, step sync) run in
a unit test without torchrun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pretrain.contract import ENV_ATTEMPT


def distributed() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    attempt: int = 1
    gpu: bool = False

    @classmethod
    def from_env(cls, *, gpu: bool) -> World:
        env = os.environ
        return cls(
            rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")),
            size=int(env.get("WORLD_SIZE", "1")), local_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
            attempt=int(env.get(ENV_ATTEMPT, "1")), gpu=gpu,
        )  # fmt: skip

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_size

    @property
    def nodes(self) -> int:
        return self.size // self.local_size

    @property
    def uploads(self) -> bool:
        """One process per node moves files (downloads, uploads): local rank 0."""
        return self.local_rank == 0

    def barrier(self) -> None:
        if distributed():
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if not distributed():
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce(self, tensor: Any) -> Any:
        """Sum `tensor` over every rank, in place; returns it."""
        if distributed():
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def device(self) -> Any:
        import torch

        return torch.device("cuda", self.local_rank) if self.gpu else torch.device("cpu")

    def to_device(self, batch: dict[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
        import torch

        device = self.device()
        return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}
