"""Tensor parallelism on one machine: ranks 1..N-1 in worker processes (spawn context).

Each worker gets one end of a pipe. Calls go down as pickled (method, args, reply) tuples,
pickled once for all workers; per-step calls (execute_step with numpy arrays) get no reply.
A worker that raises sends its traceback up and exits; a monitor thread waits on the
workers' process sentinels and, when one dies, stops the others and aborts NCCL, so the
driver's pending collective fails instead of waiting forever. Workers exit when the pipe
closes or their parent process goes away, so no worker outlives the engine.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.distributed.process_group import abort_tensor_parallel, destroy_tensor_parallel
from pagedllm.worker.distributed_executor import (
    WORKER_CALL_TIMEOUT_S,
    DistributedExecutor,
    WorkerFailure,
    WorkerHealth,
    register_finalizer,
)
from pagedllm.worker.worker import Worker

logger = logging.getLogger(__name__)

_POLL_S = 0.2  # how often a waiting driver re-checks that the workers are alive
_EXIT_GRACE_S = 10.0  # how long workers get to exit cleanly at shutdown
_REPORT_GRACE_S = 1.0  # how long a dead worker's error report may still be on its way


@dataclass
class _Workers:
    """The worker processes and the driver's ends of their pipes."""

    procs: list[BaseProcess] = field(default_factory=list)
    conns: list[Connection] = field(default_factory=list)


class MultiprocExecutor(DistributedExecutor):
    """Ranks 1..N-1 as child processes of the engine process."""

    backend_name = "mp"

    def _prepare(self) -> tuple[str, int | None]:
        self.workers = _Workers()
        register_finalizer(self, _stop_workers, self.workers, self.health)
        return "127.0.0.1", None

    def _start_workers(self, init_method: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        for rank in range(1, self.world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"pagedllm-tp-rank{rank}",
                               args=(self.config, rank, init_method, child_end, os.getpid()),
                               daemon=True)
            proc.start()
            child_end.close()
            self.workers.procs.append(proc)
            self.workers.conns.append(parent_end)
        self._collect(None, "start-up")  # each worker says "ready" once imported
        threading.Thread(target=_monitor, args=(self.workers, self.health),
                         name="pagedllm-tp-monitor", daemon=True).start()

    def _send(self, method: str, args: tuple[Any, ...], reply: bool) -> None:
        data = pickle.dumps((method, args, reply), protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.workers.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError as e:
                raise WorkerFailure(self._find_failure(wait_s=5.0)
                                    or f"rank {rank} no longer reads its pipe ({e!r})") from e

    def _collect(self, pending: Any, method: str) -> list[Any]:
        deadline = time.monotonic() + WORKER_CALL_TIMEOUT_S
        results = []
        for rank, (proc, conn) in enumerate(zip(self.workers.procs, self.workers.conns),
                                            start=1):
            while not conn.poll(_POLL_S):
                if not proc.is_alive() or self.health.error is not None:
                    raise WorkerFailure(self._find_failure(wait_s=1.0)
                                        or f"rank {rank} stopped during {method}")
                if time.monotonic() > deadline:
                    raise WorkerFailure(f"rank {rank} did not finish {method} in "
                                        f"{WORKER_CALL_TIMEOUT_S:.0f} s")
            status, value = _receive(conn, rank)
            if status == "error":
                self.health.report(value)
                raise WorkerFailure(value)
            results.append(value)
        return results

    def _find_failure(self, wait_s: float) -> str | None:
        """The first failure: a worker's own error report (read once from its pipe, then
        kept in `health`), else what the monitor saw, else a dead worker's exit code. A dead
        worker's report is waited for up to _REPORT_GRACE_S. Reads the pipes: call from the
        engine thread."""
        deadline = time.monotonic() + wait_s
        grace_end: float | None = None
        while True:
            if self.health.worker_report is not None:
                return self.health.worker_report
            # Read before looking for the dead: the monitor records a death only after the
            # process is gone, so a failure seen here has its worker in `dead` below (the
            # other order could find no one dead, then the monitor's exit code, and return
            # that without reading the dead worker's pipe).
            monitor_error = self.health.error
            dead = [(rank, proc, conn) for rank, (proc, conn)
                    in enumerate(zip(self.workers.procs, self.workers.conns), start=1)
                    if not proc.is_alive()]
            for _, _, conn in dead:
                report = _error_report(conn)
                if report is not None:
                    self.health.report(report)
                    return report
            now = time.monotonic()
            if dead:
                grace_end = grace_end if grace_end is not None else now + _REPORT_GRACE_S
                if now >= min(grace_end, deadline):
                    return self.health.error or _describe_exit(*dead[0][:2])
            elif monitor_error is not None:
                return monitor_error
            elif now >= deadline or not self.workers.procs:
                return None
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.workers.procs if p.pid is not None]


def _receive(conn: Connection, rank: int) -> tuple[str, Any]:
    try:
        return conn.recv()
    except (EOFError, OSError) as e:
        return "error", f"rank {rank} closed its pipe ({e!r})"


def _error_report(conn: Connection) -> str | None:
    """The error a dead worker sent up before exiting, if any."""
    try:
        while conn.poll(0):
            status, value = conn.recv()
            if status == "error":
                return value
    except (EOFError, OSError):
        pass
    return None


def _describe_exit(rank: int, proc: BaseProcess) -> str:
    proc.join(timeout=1.0)
    return f"rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}"


def _monitor(workers: _Workers, health: WorkerHealth) -> None:
    """Wait for any worker to die; unless shutting down, record it and stop the rest."""
    sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(workers.procs, start=1)}
    while sentinels and not health.closing:
        ready = wait(list(sentinels), timeout=1.0)
        if health.closing or not ready:
            continue
        rank, proc = sentinels[ready[0]]
        if health.fail(_describe_exit(rank, proc)):
            logger.error("Tensor-parallel worker failed: %s", health.error)
            _kill(workers)
            abort_tensor_parallel(health.communicator)
        return


def _kill(workers: _Workers) -> None:
    for proc in workers.procs:
        if proc.is_alive():
            proc.kill()
    for proc in workers.procs:
        proc.join(timeout=5.0)


def _stop_workers(workers: _Workers, health: WorkerHealth) -> None:
    """Ask the workers to exit, kill those that do not, and leave the process group."""
    health.closing = True
    stop = pickle.dumps(("shutdown", (), False))
    for conn in workers.conns:
        try:
            conn.send_bytes(stop)
        except OSError:
            pass
    deadline = time.monotonic() + _EXIT_GRACE_S
    for proc in workers.procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    _kill(workers)
    for conn in workers.conns:
        conn.close()
    if health.joined:
        destroy_tensor_parallel()


# ---------------------------------------------------------------- worker process side
def _exit_with_parent(parent_pid: int) -> None:
    """Exit this process as soon as its parent is gone (even inside a hung collective)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="pagedllm-parent-watch", daemon=True).start()


def _worker_main(config: EngineConfig, rank: int, init_method: str, conn: Connection,
                 parent_pid: int) -> None:
    """A worker process: serve the driver's calls until told to stop or orphaned."""
    # Ctrl-C reaches the whole process group; the driver decides when the workers stop
    # (a server drains its requests first).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent_pid)
    worker = Worker(config, rank, init_method)
    conn.send(("ok", os.getpid()))
    while True:
        try:
            method, args, reply = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break  # the driver is gone
        if method == "shutdown":
            break
        try:
            result = worker.call(method, *args)
        except BaseException:  # noqa: BLE001 - report anything, then leave the group
            try:
                conn.send(("error", f"rank {rank} raised in {method}:\n"
                                    f"{traceback.format_exc()}"))
            finally:
                os._exit(1)  # closes this rank's sockets: peers' collectives fail at once
        if reply:
            conn.send(("ok", result))
    worker.shutdown()
