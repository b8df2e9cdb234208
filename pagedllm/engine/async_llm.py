"""AsyncLLM: the engine loop in a background thread, with an async output stream per request.

The server's event loop submits requests and aborts through a thread-safe inbox; the engine
thread steps the engine whenever work exists and hands each RequestOutput to the request's
asyncio queue. A consumer that stops iterating (client gone, timeout) aborts its request,
which frees its KV blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pagedllm.config import EngineArgs, EngineConfig
from pagedllm.engine.input_processor import PromptType, tokenize_prompt
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.metrics.loggers import LoggingStatLogger, StatLogger
from pagedllm.metrics.stats import StatsCollector
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop stopped because of an internal error."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class AsyncLLM:
    """Serves many concurrent requests from asyncio code through one engine."""

    def __init__(self, config: EngineConfig, log_stats_interval: float = 5.0) -> None:
        self.engine = LLMEngine(config)
        self.engine.stats = StatsCollector()
        self.config = config
        self.model_config = config.model
        self.tokenizer = self.engine.tokenizer
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._error: BaseException | None = None
        # Fed once per loop turn by the engine thread: record(snapshot, iteration, now).
        self.stat_loggers: list[StatLogger] = []
        if not config.disable_log_stats:
            self.stat_loggers.append(LoggingStatLogger(log_stats_interval))
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> AsyncLLM:
        return cls(engine_args.create_engine_config())

    # ------------------------------------------------------------ public API
    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutputs of one request as tokens arrive; the last is finished.

        Raises ValueError for a bad prompt or parameters, including a prompt whose length
        plus max_tokens exceeds max_model_len.
        """
        self._raise_if_dead()
        text, ids = tokenize_prompt(prompt, self.tokenizer, self.model_config, sampling_params)
        max_len = self.model_config.max_model_len
        max_tokens = sampling_params.max_tokens
        if max_tokens is not None and len(ids) + max_tokens > max_len:
            raise ValueError(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                f"prompt, {max_tokens} for the completion). Reduce the prompt "
                "or max_tokens."
            )
        self.engine.prepare_params(sampling_params)
        if request_id in self._streams:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._inbox.put(("add", (request_id, text, ids, sampling_params, time.monotonic())))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def get_stats(self) -> dict[str, Any]:
        return self.engine.get_stats()

    async def call_in_engine(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` in the engine thread between two steps and return its result
        (for consistent reads of engine state, e.g. the dashboard's block map)."""
        self._raise_if_dead()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._inbox.put(("call", (fn, loop, future)))
        return await future

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._error is None

    async def check_health(self) -> None:
        self._raise_if_dead()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # ------------------------------------------------------------ engine thread
    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"The engine loop died: {self._error!r}") from self._error
        if not self._thread.is_alive():
            raise EngineDeadError("The engine has been shut down.")

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed
                pass

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            request_id, text, ids, params, arrival = payload
            if request_id not in self._streams:
                return  # the consumer left before the request was added
            try:
                self.engine.add_request(request_id, None, params, arrival_time=arrival,
                                        prompt_token_ids=ids, prompt_text=text)
            except Exception as e:  # invalid request: report it to its caller only
                self._deliver(request_id, e)
        elif kind == "abort":
            # A consumer still reading (abort() called from elsewhere) gets a final output.
            for final in self.engine.abort_request(payload) or []:
                self._deliver(final.request_id, final)
        elif kind == "call":
            fn, loop, future = payload
            try:
                result, error = fn(self.engine), None
            except Exception as e:  # reported to the caller, the engine goes on
                result, error = None, e
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the caller's loop is closed
                pass

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.engine.has_unfinished_requests():
                    try:
                        self._handle(*self._inbox.get(timeout=0.5))
                    except queue.Empty:
                        self._record_stats()  # idle: loggers close their windows
                        continue
                while True:
                    try:
                        self._handle(*self._inbox.get_nowait())
                    except queue.Empty:
                        break
                outputs = self.engine.step()
                for out in outputs:
                    self._deliver(out.request_id, out)
                self._record_stats()
        except BaseException as e:  # noqa: BLE001 - report any engine fault to all callers
            logger.exception("Engine loop failed")
            self._error = e
            err = EngineDeadError(f"The engine loop died: {e!r}")
            for rid in list(self._streams):
                self._deliver(rid, err)

    def _record_stats(self) -> None:
        """Hand this loop turn's stats to every stat logger (engine thread)."""
        collector = self.engine.stats
        if collector is None:
            return
        iteration = collector.take()
        if not self.stat_loggers:
            return
        snapshot = collector.snapshot(self.engine.scheduler)
        now = time.monotonic()
        for stat_logger in list(self.stat_loggers):
            try:
                stat_logger.record(snapshot, iteration, now)
            except Exception:  # a faulty logger must not stop serving
                logger.exception("Stat logger %r failed; removing it", stat_logger)
                self.stat_loggers.remove(stat_logger)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Complete `future` unless its awaiter gave up (cancelled) meanwhile."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
