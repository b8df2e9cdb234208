"""The tensor-parallel group a model's layers shard over (one process: a no-op group)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    """Rank and size of this process in its tensor-parallel group, with its collectives."""

    rank: int = 0
    world_size: int = 1
    process_group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.process_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along dim."""
        if self.world_size == 1:
            return x
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
