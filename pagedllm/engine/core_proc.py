"""The engine core process: a busy loop over `EngineCore`, talking ZeroMQ to front-ends.

Front-ends (API server processes, `--api-server-count N`) PUSH requests, aborts and utility
calls to the core's one input socket. The core PUSHes to each front-end's own output socket,
once per step, the outputs of that front-end's requests plus the step's stats (every
front-end gets every step's stats, so each one's /metrics shows the whole engine).

The process exits when its parent dies (PR_SET_PDEATHSIG on Linux, and a check of the
parent pid), when told to, or on an error, which it reports to every front-end first.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import zmq

from pagedllm.config import EngineConfig
from pagedllm.engine.core import EngineCore
from pagedllm.engine.messages import (
    Abort,
    Decoder,
    Encoder,
    EngineCoreFailed,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequest,
    Hello,
    InputMessage,
    UtilityCall,
    UtilityResult,
)
from pagedllm.utils import freeze_startup_heap

logger = logging.getLogger(__name__)

# Stats go out at least this often while idle, so that loggers close their windows.
IDLE_STATS_INTERVAL_S = 0.5
# Utility methods a front-end may call (EngineCore.<name>).
UTILITY_METHODS = frozenset({"get_stats", "dashboard_view", "reset_prefix_cache",
                             "set_step_delay", "ping"})


@dataclass(frozen=True)
class CoreAddresses:
    """ZeroMQ endpoints: one input socket, one output socket per front-end."""

    input: str
    outputs: tuple[str, ...]

    @classmethod
    def in_dir(cls, folder: str, num_clients: int) -> CoreAddresses:
        return cls(f"ipc://{folder}/in",
                   tuple(f"ipc://{folder}/out-{i}" for i in range(num_clients)))


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the process that started it dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        logger.debug("prctl(PR_SET_PDEATHSIG) unavailable", exc_info=True)


class CoreProc:
    """The loop of the engine core process (built and run by `run_engine_core`)."""

    def __init__(self, addresses: CoreAddresses, parent_pid: int | None) -> None:
        self.parent_pid = parent_pid  # None: a thread of the front-end's own process
        self.ctx = zmq.Context()
        self.input = self.ctx.socket(zmq.PULL)
        self.input.bind(addresses.input)
        self.outputs: list[zmq.Socket] = []
        for address in addresses.outputs:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)  # a slow front-end must not block the core
            sock.setsockopt(zmq.LINGER, 2000)
            sock.bind(address)
            self.outputs.append(sock)
        self.encoder = Encoder()
        self.decoder = Decoder(InputMessage)
        self.clients: set[int] = set()  # front-ends that said hello
        self.owner: dict[str, int] = {}  # sequence id -> front-end index
        self.core: EngineCore | None = None
        self._last_stats = 0.0
        self._stopping = False
        self.step_delay = 0.0

    def start_core(self, config: EngineConfig) -> None:
        """Load the model, then tell every front-end that said hello that the core is up."""
        self.core = EngineCore(config)
        ready = EngineCoreReady(self.core.num_blocks, os.getpid())
        for client in sorted(self.clients):
            self._send(client, ready)

    # ------------------------------------------------------------ messages
    def _send(self, client: int, msg: Any) -> None:
        try:
            self.outputs[client].send(self.encoder.encode(msg), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # the front-end is gone (or not connected yet: it says hello
            # again until answered); its requests are aborted below
            logger.info("Front-end %d is gone; its requests are aborted.", client)
            self.clients.discard(client)
            self._abort_client(client)

    def _abort_client(self, client: int) -> None:
        assert self.core is not None
        gone = [sid for sid, owner in self.owner.items() if owner == client]
        for sid in gone:
            self.owner.pop(sid, None)
        self.core.abort(gone)

    def _handle(self, msg: Any) -> None:
        core = self.core
        if isinstance(msg, Hello):
            self.clients.add(msg.client_index)
            if core is not None:
                self._send(msg.client_index, EngineCoreReady(core.num_blocks, os.getpid()))
            return
        assert core is not None
        if isinstance(msg, EngineCoreRequest):
            try:
                sequence_ids = core.add_request(msg)
            except Exception:  # a request the front-end let through: fail it alone
                logger.exception("Request %s rejected by the engine core", msg.request_id)
                self._send(msg.client_index, EngineCoreOutputs(
                    [EngineCoreOutput(msg.request_id, [], "abort")], timestamp=time.time()))
                return
            for sid in sequence_ids:
                self.owner[sid] = msg.client_index
        elif isinstance(msg, Abort):
            for sid in core.abort(msg.request_ids, msg.reason):
                self.owner.pop(sid, None)
        elif isinstance(msg, UtilityCall):
            self._send(msg.client_index, self._call(msg))

    def _call(self, msg: UtilityCall) -> UtilityResult:
        if msg.method not in UTILITY_METHODS:
            return UtilityResult(msg.call_id, error=f"unknown engine core method {msg.method!r}")
        try:
            return UtilityResult(msg.call_id, getattr(self, "_util_" + msg.method,
                                                      getattr(self.core, msg.method, None))(
                *msg.args))
        except Exception as e:  # reported to the caller; the core goes on
            return UtilityResult(msg.call_id, error=f"{type(e).__name__}: {e}")

    def _util_ping(self) -> int:
        return os.getpid()

    def _util_set_step_delay(self, seconds: float) -> None:
        """Sleep this long before every step: slows the engine down on purpose, to test
        and demonstrate what a slow engine does to clients (back-pressure, disconnects)."""
        self.step_delay = max(float(seconds), 0.0)

    def _drain_input(self, timeout_ms: int) -> None:
        """Handle every waiting message; wait up to `timeout_ms` for the first."""
        if timeout_ms and not self.input.poll(timeout_ms):
            return
        while True:
            try:
                frame = self.input.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(self.decoder.decode(frame.buffer))

    # ------------------------------------------------------------ loop
    def run(self) -> None:
        core = self.core
        assert core is not None
        while not self._stopping:
            busy = core.has_unfinished_requests()
            self._drain_input(0 if busy else int(IDLE_STATS_INTERVAL_S * 1000))
            if not busy and not core.has_unfinished_requests():
                self._check_parent()
                now = time.monotonic()
                if now - self._last_stats >= IDLE_STATS_INTERVAL_S:
                    self._publish([])
                continue
            if self.step_delay:
                time.sleep(self.step_delay)
            self._publish(core.step())

    def _publish(self, outputs: list[EngineCoreOutput]) -> None:
        """Send each front-end its outputs and everyone this turn's stats."""
        assert self.core is not None
        iteration, snapshot = self.core.take_stats()
        self._last_stats = time.monotonic()
        if not self.clients:
            return
        per_client: dict[int, list[EngineCoreOutput]] = {c: [] for c in self.clients}
        owner = self.owner
        for out in outputs:
            client = owner.get(out.request_id)
            if client is None:
                continue  # aborted meanwhile
            if out.finish_reason is not None:
                del owner[out.request_id]
            bucket = per_client.get(client)
            if bucket is not None:
                bucket.append(out)
        now = time.time()
        for client, outs in per_client.items():
            self._send(client, EngineCoreOutputs(outs, iteration, snapshot, now))

    def stop(self) -> None:
        """End `run` after the current step (or idle wait)."""
        self._stopping = True

    def _check_parent(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            logger.error("The process that started the engine core is gone; exiting.")
            self._stopping = True

    def report_failure(self, exc: BaseException) -> None:
        """Tell every front-end (also ones that have not said hello yet) why the core
        stops."""
        msg = EngineCoreFailed(type(exc).__name__, str(exc), traceback.format_exc())
        try:
            self._drain_hellos()
        except Exception:  # noqa: BLE001 - best effort while failing
            pass
        for client in sorted(self.clients):
            try:
                self._send(client, msg)
            except Exception:  # noqa: BLE001
                pass

    def _drain_hellos(self) -> None:
        while True:
            try:
                frame = self.input.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = self.decoder.decode(frame.buffer)
            if isinstance(msg, Hello):
                self.clients.add(msg.client_index)

    def close(self) -> None:
        if self.core is not None:
            self.core.shutdown()
        for sock in self.outputs:
            sock.close(linger=2000)
        self.input.close(linger=0)
        self.ctx.term()


def run_engine_core(config: EngineConfig, addresses: CoreAddresses, parent_pid: int,
                    log_level: int) -> None:
    """Entry point of the engine core process."""
    die_with_parent()
    logging.basicConfig(level=log_level,
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("pagedllm").setLevel(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front-end decides when to stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    proc = CoreProc(addresses, parent_pid)
    try:
        proc.start_core(config)
        freeze_startup_heap()  # the model, caches and graphs stay for the process's life
        proc.run()
    except SystemExit:
        pass
    except BaseException as e:  # noqa: BLE001 - report any fault to the front-ends
        logger.exception("The engine core failed")
        proc.report_failure(e)
        _exit_after_close(proc, 1)
    _exit_after_close(proc, 0)


def _exit_after_close(proc: CoreProc, code: int) -> None:
    try:
        proc.close()
    finally:
        logging.shutdown()
        os._exit(code)
