"""The tensor-parallel group a model's layers shard over (one process: a no-op group)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from pagedllm.distributed.nccl import NcclCommunicator


@dataclass(frozen=True)
class TensorParallelGroup:
    """Rank and size of this process in its tensor-parallel group, with its collectives."""

    rank: int = 0
    world_size: int = 1
    process_group: Any = None
    # On GPUs: NCCL called directly, so that collectives can be captured in CUDA graphs.
    communicator: NcclCommunicator | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; returns x."""
        if self.world_size == 1:
            return x
        if self.communicator is not None:
            return self.communicator.all_reduce(x)
        dist.all_reduce(x, group=self.process_group)
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """x of rank `src` on every rank, in place; returns x."""
        if self.world_size == 1:
            return x
        if self.communicator is not None:
            return self.communicator.broadcast(x, src)
        dist.broadcast(x, src, group=self.process_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along dim."""
        if self.world_size == 1:
            return x
        if self.communicator is not None:
            return torch.cat(self.communicator.all_gather(x).unbind(0), dim=dim)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.process_group)
        return torch.cat(parts, dim=dim)

    def shard(self, size: int, name: str) -> int:
        """Size of this rank's slice of a dimension of `size` elements."""
        if size % self.world_size:
            raise ValueError(
                f"{name}={size} is not divisible by tensor_parallel_size={self.world_size}; "
                "choose a tensor_parallel_size that divides it."
            )
        return size // self.world_size


SINGLE_PROCESS = TensorParallelGroup()
