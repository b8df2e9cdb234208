"""The front-end's side of the engine core process: start it, talk to it, watch it.

`start_core_process` spawns the core (`core_proc.run_engine_core`); `CoreClient` connects
one front-end to it: requests, aborts and utility calls go out on a PUSH socket, outputs
come back on the front-end's own PULL socket, read by an asyncio task in the event loop
that serves the requests. A dead core (killed, crashed, out of memory) is noticed through a
pidfd (or by polling) and fails every waiting caller at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import select
import shutil
import signal
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from pagedllm.config import EngineConfig
from pagedllm.engine.core_proc import CoreAddresses, run_engine_core
from pagedllm.engine.core_thread import CoreThread
from pagedllm.engine.messages import (
    Abort,
    Decoder,
    Encoder,
    EngineCoreFailed,
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequest,
    Hello,
    OutputMessage,
    UtilityCall,
    UtilityResult,
)

logger = logging.getLogger(__name__)

# How long the front-end waits for the core to load the model.
STARTUP_TIMEOUT_S = 3600.0
# How often the front-end repeats its hello while it waits for the core's answer.
HELLO_INTERVAL_S = 1.0


class EngineDeadError(RuntimeError):
    """The engine core stopped (crashed, killed, or shut down)."""


@dataclass
class CoreProcess:
    """A running engine core process (or `CoreThread`), as its launcher holds it."""

    process: multiprocessing.process.BaseProcess | CoreThread
    addresses: CoreAddresses
    folder: str

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the core (and so its tensor-parallel workers) and remove its sockets."""
        if self.process.is_alive():
            self.process.terminate()  # SIGTERM: the core exits through its cleanup
            self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("The engine core did not stop in %.0f s; killing it.", timeout)
            self.process.kill()
            self.process.join(5)
        if isinstance(self.process, CoreThread) and not self.process.is_alive():
            self.process.close_sentinel()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_core_process(config: EngineConfig, num_clients: int = 1,
                       in_thread: bool = False) -> CoreProcess:
    """Spawn the engine core process (or, `in_thread`, start it on a thread of this one:
    `core_thread`); it binds its sockets in a fresh private folder."""
    folder = tempfile.mkdtemp(prefix="pagedllm-core-")
    addresses = CoreAddresses.in_dir(folder, num_clients)
    process: multiprocessing.process.BaseProcess | CoreThread
    if in_thread:
        process = CoreThread(config, addresses)
    else:
        ctx = multiprocessing.get_context("spawn")
        level = logging.getLogger("pagedllm").getEffectiveLevel()
        process = ctx.Process(target=run_engine_core, name="pagedllm-engine-core",
                              args=(config, addresses, os.getpid(), level), daemon=False)
    process.start()
    return CoreProcess(process, addresses, folder)


def describe_exit(pid: int, code: int | None) -> str:
    if code is None:
        return f"the engine core process (pid {pid}) is gone"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"the engine core process (pid {pid}) was killed by {name}{hint}"
    return f"the engine core process (pid {pid}) exited with code {code}"


class _ProcessWatch:
    """Tells whether the core process is alive; its fd turns readable when it exits."""

    def __init__(self, pid: int,
                 process: multiprocessing.process.BaseProcess | CoreThread | None) -> None:
        self.pid = pid
        self.process = process
        self.fd: int | None = None
        if process is not None:
            self.fd = process.sentinel
        elif hasattr(os, "pidfd_open"):
            try:
                self.fd = os.pidfd_open(pid)
            except OSError:
                self.fd = None

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.is_alive()
        if self.fd is not None:
            readable, _, _ = select.select([self.fd], [], [], 0)
            return not readable
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def exit_reason(self) -> str:
        code = None
        if self.process is not None:
            self.process.join(1.0)  # reaps it, so that the exit code is known
            code = self.process.exitcode
        return describe_exit(self.pid, code)


class CoreClient:
    """One front-end's connection to the engine core.

    `on_outputs(msg)` is called in the event loop for every `EngineCoreOutputs`;
    `on_dead(error)` once when the core is found dead.
    """

    def __init__(self, addresses: CoreAddresses, client_index: int = 0,
                 process: CoreProcess | None = None, core_pid: int | None = None) -> None:
        self.addresses = addresses
        self.client_index = client_index
        self.process = process
        self.ctx = zmq.Context()
        self.input = self.ctx.socket(zmq.PUSH)
        self.input.setsockopt(zmq.SNDHWM, 0)
        self.input.setsockopt(zmq.LINGER, 0)
        self.input.connect(addresses.input)
        self.output = self.ctx.socket(zmq.PULL)
        self.output.setsockopt(zmq.RCVHWM, 0)
        self.output.setsockopt(zmq.LINGER, 0)
        self.output.connect(addresses.outputs[client_index])
        self.encoder = Encoder()
        self.decoder = Decoder(OutputMessage)
        self.num_blocks = 0
        self.error: EngineDeadError | None = None
        self._calls = itertools.count()
        self._pending_calls: dict[int, asyncio.Future[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Future[Any]] = []
        self.on_outputs: Callable[[EngineCoreOutputs], None] = lambda msg: None
        self.on_dead: Callable[[EngineDeadError], None] = lambda err: None
        self._closed = False
        pid = process.pid if process is not None else core_pid
        if pid is None:
            raise ValueError("CoreClient needs the core process or its pid.")
        self.watch = _ProcessWatch(pid, process.process if process is not None else None)
        self._send(Hello(client_index))

    # ------------------------------------------------------------ start-up
    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> EngineCoreReady:
        """Block until the core has loaded the model; its failure is raised here.

        The hello is repeated every second until the core answers: ZeroMQ connects the two
        sockets independently, so the first hello can reach a core that cannot answer yet
        (this front-end's output socket not connected), and that answer is dropped."""
        deadline = time.monotonic() + timeout
        next_hello = time.monotonic() + HELLO_INTERVAL_S
        while time.monotonic() < deadline:
            if time.monotonic() >= next_hello:
                self._send(Hello(self.client_index))
                next_hello = time.monotonic() + HELLO_INTERVAL_S
            if self.output.poll(200):
                msg = self.decoder.decode(self.output.recv(copy=False).buffer)
                if isinstance(msg, EngineCoreReady):
                    self.num_blocks = msg.num_blocks
                    return msg
                if isinstance(msg, EngineCoreFailed):
                    raise _startup_error(msg)
                continue  # stats of a core that is already serving other front-ends
            if not self.watch.alive():
                raise RuntimeError(f"The engine failed to start: {self.watch.exit_reason()}; "
                                   "see the log above.")
        raise RuntimeError(f"The engine core did not start within {timeout:.0f} s.")

    # ------------------------------------------------------------ sending
    def _send(self, msg: Any) -> None:
        self.input.send(self.encoder.encode(msg), flags=zmq.NOBLOCK, copy=False)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.check_alive()
        self._send(request)

    def abort(self, request_ids: list[str], reason: str = "abort") -> None:
        if request_ids and self.error is None and not self._closed:
            self._send(Abort(request_ids, reason))

    async def call(self, method: str, *args: Any) -> Any:
        """Run `EngineCore.<method>(*args)` in the core between two steps."""
        self.ensure_running()
        self.check_alive()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        call_id = self.next_call_id()
        self._pending_calls[call_id] = future
        try:
            self.send_call(call_id, method, args)
            return await future
        finally:
            self._pending_calls.pop(call_id, None)

    def next_call_id(self) -> int:
        return next(self._calls)

    def send_call(self, call_id: int, method: str, args: tuple[Any, ...]) -> None:
        """Ask the core to run `EngineCore.<method>(*args)`; a UtilityResult answers."""
        self._send(UtilityCall(call_id, method, list(args), self.client_index))

    def check_alive(self) -> None:
        if self.error is not None:
            raise self.error
        if self._closed:
            raise EngineDeadError("The engine has been shut down.")
        if not self.watch.alive():
            self._mark_dead(EngineDeadError(f"The engine died: {self.watch.exit_reason()}."))
            assert self.error is not None
            raise self.error

    # ------------------------------------------------------------ receiving
    def ensure_running(self) -> None:
        """Start the output reader in the running event loop (the first caller's)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("The engine is already served by another event loop.")
        self._loop = loop
        shadow = zmq.asyncio.Socket.shadow(self.output.underlying)
        self._tasks = [loop.create_task(self._read_outputs(shadow), name="pagedllm-outputs")]
        if self.watch.fd is not None:
            loop.add_reader(self.watch.fd, self._on_process_exit)

    def _on_process_exit(self) -> None:
        if self._loop is not None and self.watch.fd is not None:
            self._loop.remove_reader(self.watch.fd)
        if not self._closed:
            self._mark_dead(EngineDeadError(f"The engine died: {self.watch.exit_reason()}."))

    async def _read_outputs(self, sock: zmq.asyncio.Socket) -> None:
        decode = self.decoder.decode
        while True:
            try:
                frame = await sock.recv(copy=False)
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            msg = decode(frame.buffer)
            if isinstance(msg, EngineCoreOutputs):
                try:
                    self.on_outputs(msg)
                except Exception as e:  # noqa: BLE001 - a front-end bug must not hang callers
                    logger.exception("Processing engine outputs failed")
                    self._mark_dead(EngineDeadError(f"Processing engine outputs failed: {e!r}"))
                    return
            elif isinstance(msg, UtilityResult):
                future = self._pending_calls.get(msg.call_id)
                if future is not None and not future.done():
                    if msg.error is not None:
                        future.set_exception(RuntimeError(msg.error))
                    else:
                        future.set_result(msg.result)
            elif isinstance(msg, EngineCoreFailed):
                logger.error("The engine core failed: %s: %s\n%s", msg.error_type, msg.message,
                             msg.traceback)
                self._mark_dead(EngineDeadError(
                    f"The engine died: {msg.error_type}: {msg.message}"))
                return
            # EngineCoreReady again (a repeated hello): nothing to do

    def _mark_dead(self, error: EngineDeadError) -> None:
        if self.error is not None:
            return
        self.error = error
        logger.error("%s In-flight requests are failed; /health now answers 503.", error)
        for future in list(self._pending_calls.values()):
            if not future.done():
                future.set_exception(error)
        self.on_dead(error)

    # ------------------------------------------------------------ shutdown
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            def stop_reading() -> None:
                for task in self._tasks:
                    task.cancel()
                if self.watch.fd is not None:
                    loop.remove_reader(self.watch.fd)

            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            try:
                if running is loop:
                    stop_reading()
                else:
                    loop.call_soon_threadsafe(stop_reading)
            except RuntimeError:  # the loop closed meanwhile
                pass
        self.input.close(linger=0)
        self.output.close(linger=0)
        self.ctx.term()


_STARTUP_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError, "TypeError": TypeError, "MemoryError": MemoryError,
    "FileNotFoundError": FileNotFoundError, "ImportError": ImportError,
}


def _startup_error(msg: EngineCoreFailed) -> Exception:
    """The core's start-up failure as the same kind of exception (a bad model or flag is a
    ValueError here as in the offline engine)."""
    kind = _STARTUP_ERRORS.get(msg.error_type, RuntimeError)
    if kind is RuntimeError:
        return RuntimeError(f"The engine failed to start: {msg.error_type}: {msg.message}")
    return kind(msg.message)


class SyncCoreClient:
    """The engine core in its own process, driven synchronously: the offline `LLMEngine`'s
    core when `PAGEDLLM_ENABLE_MULTIPROCESSING=1`. It has the in-process `EngineCore`'s
    methods; `step()` returns the outputs of the core steps that arrived, waiting for one."""

    def __init__(self, config: EngineConfig) -> None:
        self.process = start_core_process(config)
        try:
            self.client = CoreClient(self.process.addresses, 0, self.process)
            self.client.wait_ready()
        except BaseException:
            self.process.shutdown()
            raise
        self.num_blocks = self.client.num_blocks
        self._early: list[EngineCoreOutputs] = []  # outputs read while waiting for a call
        # An engine dropped without shutdown() still stops its core.
        self._finalizer = weakref.finalize(self, _stop_core, self.client, self.process)

    def add(self, request_id: str, prompt_token_ids: list[int], params: Any,
            eos_token_id: int | None, arrival_time: float) -> None:
        self.client.add_request(EngineCoreRequest.make(
            request_id, prompt_token_ids, params, eos_token_id, arrival_time, 0))

    def abort(self, request_ids: list[str], reason: str = "abort") -> None:
        self.client.abort(request_ids, reason)

    def step(self) -> list[Any]:
        """The outputs of every core step received so far, waiting for at least one."""
        messages, self._early = self._early, []
        if not messages:
            messages.append(self._receive(block=True))
        while (msg := self._receive(block=False)) is not None:
            messages.append(msg)
        return [out for msg in messages if isinstance(msg, EngineCoreOutputs)
                for out in msg.outputs]

    def _receive(self, block: bool) -> Any:
        sock = self.client.output
        while True:
            if sock.poll(200 if block else 0):
                msg = self.client.decoder.decode(sock.recv(copy=False).buffer)
                if isinstance(msg, EngineCoreFailed):
                    raise EngineDeadError(f"The engine died: {msg.error_type}: {msg.message}")
                return msg
            if not block:
                return None
            self.client.check_alive()

    def call(self, method: str, *args: Any) -> Any:
        """Run `EngineCore.<method>(*args)` in the core between two steps."""
        self.client.check_alive()
        call_id = self.client.next_call_id()
        self.client.send_call(call_id, method, args)
        while True:
            msg = self._receive(block=True)
            if isinstance(msg, UtilityResult) and msg.call_id == call_id:
                if msg.error is not None:
                    raise RuntimeError(msg.error)
                return msg.result
            if isinstance(msg, EngineCoreOutputs):
                self._early.append(msg)

    def get_stats(self) -> dict[str, Any]:
        return self.call("get_stats")

    def reset_prefix_cache(self) -> bool:
        return self.call("reset_prefix_cache")

    def shutdown(self) -> None:
        self._finalizer()


def _stop_core(client: CoreClient, process: CoreProcess) -> None:
    client.close()
    process.shutdown()
