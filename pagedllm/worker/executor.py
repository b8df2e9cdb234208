"""Executors run the model runner(s): in this process, or one process per TP rank."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from pagedllm.config import EngineConfig
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.worker.output import ModelRunnerOutput

if TYPE_CHECKING:
    from pagedllm.worker.model_runner import PendingStep


class Executor(Protocol):
    def determine_num_blocks(self) -> int: ...
    def allocate_kv_cache(self, num_blocks: int) -> None: ...
    def warm_up(self) -> None: ...
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput: ...
    def shutdown(self) -> None: ...


class UniProcExecutor:
    """One model runner in the engine's own process."""

    def __init__(self, config: EngineConfig) -> None:
        from pagedllm.worker.model_runner import ModelRunner

        self.runner = ModelRunner(config)

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def warm_up(self) -> None:
        self.runner.warm_up()

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(out)

    def execute_async(self, out: SchedulerOutput) -> PendingStep:
        """Launch a plain step without waiting for it (async scheduling)."""
        return self.runner.execute_async(out)

    def fetch(self, pending: PendingStep) -> ModelRunnerOutput:
        return self.runner.fetch(pending)

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig) -> Executor:
    """One process for tensor_parallel_size=1; else worker processes (mp) or Ray actors."""
    backend = config.parallel.distributed_executor_backend
    if config.parallel.tensor_parallel_size == 1:
        return UniProcExecutor(config)
    if backend == "ray":
        from pagedllm.worker.ray_executor import RayExecutor

        return RayExecutor(config)
    from pagedllm.worker.mp_executor import MultiprocExecutor

    return MultiprocExecutor(config)
