"""The engine core on a thread of the server's own process, behind the same sockets.

On the CPU with one API server, a second process costs more than it gives: a second
interpreter importing torch and transformers (seconds of start-up, some 300 MB resident)
for a core whose torch work releases the GIL anyway. `CoreThread` runs the very loop of
the core process (`core_proc.CoreProc`: same ZeroMQ messages, same step contract) on a
thread, and looks to `CoreProcess` / `core_client` like a process: `pid`, `sentinel` (a
pipe that turns readable when the loop ends), `is_alive`, `join`, `exitcode`,
`terminate`. `PAGEDLLM_ENABLE_MULTIPROCESSING=1` keeps the core in a process of its own.
"""

from __future__ import annotations

import logging
import os
import threading

from pagedllm.config import EngineConfig
from pagedllm.engine.core_proc import CoreAddresses, CoreProc

logger = logging.getLogger(__name__)


class CoreThread:
    """The engine core loop on a daemon thread, with a process's interface."""

    def __init__(self, config: EngineConfig, addresses: CoreAddresses) -> None:
        self.name = "pagedllm-engine-core"
        self.pid = os.getpid()
        self.exitcode: int | None = None
        self.sentinel, self._done_fd = os.pipe()
        self._proc = CoreProc(addresses, parent_pid=None)
        self._thread = threading.Thread(target=self._run, args=(config,), name=self.name,
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self, config: EngineConfig) -> None:
        code = 0
        try:
            self._proc.start_core(config)
            self._proc.run()
        except BaseException as e:  # noqa: BLE001 - report any fault to the front-ends
            logger.exception("The engine core failed")
            self._proc.report_failure(e)
            code = 1
        finally:
            try:
                self._proc.close()
            finally:
                self.exitcode = code
                os.close(self._done_fd)  # the sentinel turns readable

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def terminate(self) -> None:
        """Ask the loop to stop after its current step (or idle wait)."""
        self._proc.stop()

    def close_sentinel(self) -> None:
        """Release the sentinel pipe once the loop has ended and nobody watches it."""
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1

    kill = terminate  # a thread cannot be killed; the loop stops at its next turn


def core_in_thread(config: EngineConfig, num_clients: int) -> bool:
    """Whether the server's engine core runs on a thread: on the CPU with one front-end and
    no tensor parallelism, unless PAGEDLLM_ENABLE_MULTIPROCESSING=1 asks for a process."""
    from pagedllm.entrypoints.llm import MULTIPROCESSING_ENV, core_process_enabled

    if os.environ.get(MULTIPROCESSING_ENV, "").strip():
        return not core_process_enabled()
    return (config.device.device == "cpu" and num_clients == 1
            and config.parallel.tensor_parallel_size == 1)
