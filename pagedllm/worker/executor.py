"""Executors run the model runner(s): in this process, or one process per TP rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pagedllm.config import EngineConfig
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.worker.output import ModelRunnerOutput

if TYPE_CHECKING:
    from pagedllm.worker.model_runner import ModelRunner, PendingStep
    from pagedllm.worker.output import GrammarOutput

BeforeSample = Callable[[], "GrammarOutput | None"]


class Executor(Protocol):
    def determine_num_blocks(self) -> int: ...
    def allocate_kv_cache(self, num_blocks: int) -> None: ...
    def warm_up(self) -> None: ...
    def execute(self, out: SchedulerOutput,
                before_sample: BeforeSample | None = None) -> PendingStep: ...
    def fetch(self, pending: PendingStep) -> ModelRunnerOutput: ...
    def shutdown(self) -> None: ...


class UniProcExecutor:
    """One model runner in the engine's own process."""

    def __init__(self, config: EngineConfig) -> None:
        from pagedllm.worker.model_runner import ModelRunner

        self._runner: ModelRunner | None = ModelRunner(config)

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise RuntimeError("The engine was shut down; create a new LLM to run more "
                               "requests.")
        return self._runner

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def warm_up(self) -> None:
        self.runner.warm_up()

    def execute(self, out: SchedulerOutput,
                before_sample: BeforeSample | None = None) -> PendingStep:
        """Launch a step without waiting for its results (`fetch` collects them)."""
        return self.runner.execute(out, before_sample)

    def fetch(self, pending: PendingStep) -> ModelRunnerOutput:
        return self.runner.fetch(pending)

    def shutdown(self) -> None:
        """Drop the model runner (weights, KV cache, CUDA graphs) so that its GPU memory goes
        back at once, even while the engine object lives on (a second engine in the process
        profiles the memory that is free)."""
        runner, self._runner = self._runner, None
        if runner is not None and runner.device.type == "cuda":
            import gc

            import torch

            runner.release_graphs()  # a caller may still hold the graphs object
            del runner
            gc.collect()
            torch.cuda.empty_cache()


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
