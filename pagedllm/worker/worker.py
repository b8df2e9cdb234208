"""One tensor-parallel rank: its place in the process group and its model runner.

The driver rank (0) lives in the engine process; the other ranks in worker processes (mp)
or Ray actors, which the executor drives through `call(method, *args)`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed.group import TensorParallelGroup
from pagedllm.distributed.process_group import destroy_tensor_parallel, init_tensor_parallel

if TYPE_CHECKING:
    from pagedllm.worker.model_runner import ModelRunner


class Worker:
    """Runs one rank's share of every step."""

    def __init__(self, config: EngineConfig, rank: int, init_method: str,
                 gpu: int | None = None) -> None:
        self.config = config
        self.rank = rank
        self.world_size = config.parallel.tensor_parallel_size
        self.init_method = init_method
        self.gpu = rank if gpu is None else gpu  # CUDA ordinal in this process
        self.tp: TensorParallelGroup | None = None
        self._runner: ModelRunner | None = None

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise RuntimeError(f"Rank {self.rank} has no model loaded.")
        return self._runner

    def init_device(self) -> None:
        """Select this rank's device and join the process group (waits for every rank)."""
        device = self.config.device.device
        if device == "cuda":
            torch.cuda.set_device(self.gpu)
        elif self.rank > 0:
            # A worker process shares the CPU cores with the other ranks.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world_size))
        self.tp = init_tensor_parallel(device, self.init_method, self.rank, self.world_size)

    def load_model(self) -> None:
        from pagedllm.worker.model_runner import ModelRunner

        assert self.tp is not None, "init_device() comes first"
        self._runner = ModelRunner(self.config, self.tp)

    def call(self, method: str, *args: Any) -> Any:
        """Run this Worker's method of that name, else its ModelRunner's (determine_num_blocks,
        allocate_kv_cache, warm_up, copy_blocks, execute_step, ...)."""
        own = getattr(self, method, None)
        return (own or getattr(self.runner, method))(*args)

    def shutdown(self) -> None:
        """Free the model (its CUDA graphs before the NCCL communicator they use) and leave
        the process group."""
        if self._runner is not None:
            self._runner.graphs = None
            self._runner = None
        if self.tp is not None:  # never leave a group another engine of this process joined
            tp, self.tp = self.tp, None
            destroy_tensor_parallel(tp)
