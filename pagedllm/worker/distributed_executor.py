"""Tensor parallelism over several ranks: the part shared by the mp and Ray executors.

Rank 0 (the driver) runs in the engine process: it prepares each step's inputs once on the
host, sends them (numpy arrays, no Request objects) to ranks 1..N-1, runs its own share of
the forward pass, and samples. The other ranks run the same forward pass and LM head and
send nothing back; their failures are watched for by a monitor thread, which stops every
rank so that a collective waiting on a dead peer ends in a RuntimeError instead of a hang.
"""

from __future__ import annotations

import logging
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pagedllm.config import EngineConfig
from pagedllm.distributed.process_group import check_no_process_group
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.utils import get_open_port
from pagedllm.worker.step_inputs import StepInputs
from pagedllm.worker.worker import Worker

if TYPE_CHECKING:
    from pagedllm.worker.executor import BeforeSample
    from pagedllm.worker.model_runner import ModelRunner, PendingStep
    from pagedllm.worker.output import ModelRunnerOutput

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# How long a call to the workers (model loading, memory profiling, CUDA graph capture) may
# take before the engine gives up on them.
WORKER_CALL_TIMEOUT_S = 1800.0


class WorkerFailure(RuntimeError):
    """A worker rank died or raised; the message says which and how."""


class WorkerHealth:
    """Failure state shared by an executor and its monitor thread. The thread holds this,
    not the executor, so that a dropped executor is collected and its workers stopped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.error: str | None = None
        self.closing = False
        self.joined = False  # this process (rank 0) is in the process group: leave it at stop
        self.communicator: Any = None  # rank 0's direct NCCL communicator, aborted on failure
        self.worker_report: str | None = None  # a worker's own account (its traceback)

    def fail(self, error: str) -> bool:
        """Record the first failure; False if one was recorded or shutdown began."""
        with self._lock:
            if self.error is not None or self.closing:
                return False
            self.error = error
            return True

    def report(self, report: str) -> None:
        """Keep a worker's own account of its failure: it wins over an exit code the monitor
        may have recorded first, for every later reader (the pipe gives it once)."""
        with self._lock:
            self.worker_report = report
            if not self.closing:
                self.error = report


class DistributedExecutor(ABC):
    """Runs tensor-parallel rank 0 here and ranks 1..N-1 elsewhere, in lock step."""

    backend_name = ""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.world_size = config.parallel.tensor_parallel_size
        self.health = WorkerHealth()
        self.driver: Worker | None = None
        self._finalizer: Callable[[], Any] | None = None
        check_no_process_group()
        try:
            host, driver_gpu = self._prepare()
            init_method = f"tcp://{host}:{get_open_port()}"
            self.driver = Worker(config, 0, init_method, driver_gpu)
            self._start_workers(init_method)
            self._run_all("init_device")
            self.health.joined = True
            self.health.communicator = self.driver.tp.communicator
            self._run_all("load_model")
        except BaseException:
            self.shutdown()
            raise
        logger.info("Tensor parallelism: %d ranks (%s workers, %s)", self.world_size,
                    self.backend_name, self.config.device.device)

    # ------------------------------------------------------------ backend hooks
    @abstractmethod
    def _prepare(self) -> tuple[str, int | None]:
        """Reserve resources (registering their release with `register_finalizer`); return
        the host of rank 0's TCP store and the driver's CUDA ordinal (None: 0)."""

    @abstractmethod
    def _start_workers(self, init_method: str) -> None:
        """Start ranks 1..N-1 and their monitor thread; return once they are up."""

    @abstractmethod
    def _send(self, method: str, args: tuple[Any, ...], reply: bool) -> Any:
        """Have every worker call Worker.<method>(*args); returns what _collect waits on."""

    @abstractmethod
    def _collect(self, pending: Any, method: str) -> list[Any]:
        """Wait for the workers' results of one _send (WorkerFailure if one fails)."""

    @abstractmethod
    def _find_failure(self, wait_s: float) -> str | None:
        """A description of a failed worker (waiting up to wait_s for one to show), or None."""

    @abstractmethod
    def worker_pids(self) -> list[int]:
        """Process ids of ranks 1..N-1."""

    # ------------------------------------------------------------ calls
    @property
    def runner(self) -> ModelRunner:
        """The driver rank's model runner (rank 0)."""
        assert self.driver is not None
        return self.driver.runner

    def _run_all(self, method: str, *args: Any) -> list[Any]:
        """Worker.<method>(*args) on every rank, the driver's concurrently with the others'
        (the calls may hold collectives); returns the results in rank order."""
        self._check_healthy(method)
        assert self.driver is not None
        try:
            pending = self._send(method, args, reply=True)
            local = self.driver.call(method, *args)
            return [local, *self._collect(pending, method)]
        except BaseException as e:
            raise self._fail(method, e) from e

    def determine_num_blocks(self) -> int:
        """The fewest KV blocks any rank has room for."""
        return min(self._run_all("determine_num_blocks"))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._run_all("allocate_kv_cache", num_blocks)

    def warm_up(self) -> None:
        """CUDA graph capture: every rank captures the same batch sizes in the same order."""
        self._run_all("warm_up")

    def _broadcast_step(self, step: StepInputs) -> None:
        self._send("execute_step", (step,), reply=False)

    def execute(self, out: SchedulerOutput,
                before_sample: BeforeSample | None = None) -> PendingStep:
        """Launch a step on every rank without waiting for its results."""
        self._check_healthy("execute")

        def run() -> PendingStep:
            if out.block_copies:
                self._send("copy_blocks", (out.block_copies,), reply=False)
            return self.runner.execute(out, before_sample, self._broadcast_step)

        return self._step(run)

    def fetch(self, pending: PendingStep) -> ModelRunnerOutput:
        """Wait for a launched step's sampled ids (an error if a rank died meanwhile)."""
        return self._step(lambda: self.runner.fetch(pending))

    def _step(self, run: Callable[[], _T]) -> _T:
        """The driver's part of a step; a rank that fails meanwhile (the monitor records
        it) voids the result and stops the engine."""
        try:
            result = run()
            if self.health.error is not None:
                raise WorkerFailure(self.health.error)
            return result
        except BaseException as e:
            raise self._fail("execute", e) from e

    # ------------------------------------------------------------ failures
    def _check_healthy(self, context: str) -> None:
        """Raise if the engine failed (a worker that died while idle is found here)."""
        if self.health.error is not None:
            if not self.health.closing:
                raise self._fail(context, WorkerFailure(self.health.error))
            raise RuntimeError(f"The tensor-parallel engine has failed: {self.health.error}")
        if self.health.closing:
            raise RuntimeError("The tensor-parallel engine has been shut down.")

    def _fail(self, context: str, error: BaseException) -> BaseException:
        """Stop every rank after a failure during `context`; return the error to raise."""
        cause = self._find_failure(wait_s=5.0)
        if cause is None and isinstance(error, WorkerFailure):
            cause = str(error)
        if cause is None and isinstance(error, KeyboardInterrupt | SystemExit):
            self.shutdown()  # the ranks may be out of step: they cannot go on
            return error
        if cause is None:
            cause = f"rank 0 (the driver) raised {error!r}"
        cause = self.health.worker_report or cause  # the fullest account wins
        self.health.error = cause
        self.shutdown()
        return RuntimeError(f"Tensor-parallel {context} failed: {cause}\nEvery rank was "
                            "stopped; create a new engine to continue.")

    # ------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop the workers and leave the process group (also run when the executor is
        garbage-collected or the interpreter exits)."""
        self.health.closing = True
        if self.driver is not None and self.driver.tp is not None:
            self.health.joined = True  # also when a worker failed to join
        if self._finalizer is not None:
            self._finalizer()
        if self.driver is not None:
            self.driver.shutdown()


def register_finalizer(executor: DistributedExecutor, stop: Callable[..., None],
                       *args: Any) -> None:
    """Run stop(*args) at shutdown, collection or interpreter exit (once). `args` must not
    reference the executor, or it would never be collected."""
    executor._finalizer = weakref.finalize(executor, stop, *args)
