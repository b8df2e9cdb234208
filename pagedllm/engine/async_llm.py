"""AsyncLLM: the server's front-end over an engine core in its own process.

The front-end tokenizes and checks requests, sends them to the core (`core_client`), and
turns the core's per-step token ids into RequestOutputs: incremental detokenization, stop
strings (a hit is sent back to the core as a finish), logprob dicts. Outputs reach each
request's `RequestOutputCollector`, which merges steps for a consumer that reads slowly. A
consumer that stops iterating (client gone, timeout) aborts its request, which frees its KV
blocks at the core's next step boundary.

With `--api-server-count N`, N processes each run one AsyncLLM connected to the same core
(`client_index` 0..N-1); the first one's launcher starts the core.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from pagedllm.config import EngineArgs, EngineConfig
from pagedllm.engine.core_client import (
    CoreClient,
    CoreProcess,
    EngineDeadError,
    start_core_process,
)
from pagedllm.engine.core_proc import CoreAddresses
from pagedllm.engine.core_thread import core_in_thread
from pagedllm.engine.input_processor import InputProcessor, PromptType
from pagedllm.engine.messages import EngineCoreOutputs, EngineCoreRequest, child_request_ids
from pagedllm.engine.output_collector import RequestOutputCollector
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.metrics.loggers import LoggingStatLogger, StatLogger
from pagedllm.metrics.stats import SchedulerSnapshot
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError"]

# Prompts longer than this many characters are tokenized in a worker thread, so that the
# event loop keeps serving (health checks, other streams) meanwhile.
THREAD_TOKENIZE_CHARS = 20_000


class AsyncLLM:
    """Serves many concurrent requests from asyncio code through one engine core."""

    def __init__(self, config: EngineConfig, log_stats_interval: float = 5.0,
                 client_index: int = 0, core_addresses: CoreAddresses | None = None,
                 core_pid: int | None = None, num_clients: int = 1) -> None:
        self.config = config
        self.model_config = config.model
        self.client_index = client_index
        # The launcher (client 0 without given addresses) owns the core process.
        self.core_process: CoreProcess | None = None
        if core_addresses is None:
            self.core_process = start_core_process(config, num_clients,
                                                   in_thread=core_in_thread(config, num_clients))
            core_addresses = self.core_process.addresses
        try:
            self.client = CoreClient(core_addresses, client_index, self.core_process, core_pid)
            self.input_processor = InputProcessor(config)  # tokenizer loads meanwhile
            self.client.wait_ready()
        except BaseException:
            self._stop_core()
            raise
        self.tokenizer = self.input_processor.tokenizer
        self.output_processor = OutputProcessor(self.tokenizer)
        self.collectors: dict[str, RequestOutputCollector] = {}
        self.snapshot: SchedulerSnapshot | None = None
        # Fed once per core step (and twice a second while idle): record(snapshot, it, now).
        self.stat_loggers: list[StatLogger] = []
        if not config.disable_log_stats and client_index == 0:
            self.stat_loggers.append(LoggingStatLogger(log_stats_interval))
        self.client.on_outputs = self._on_outputs
        self.client.on_dead = self._on_dead
        logger.info("Front-end %d connected to the engine core (process %d).", client_index,
                    self.client.watch.pid)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> AsyncLLM:
        return cls(engine_args.create_engine_config(usage="server"))

    @property
    def core_pid(self) -> int:
        return self.client.watch.pid

    # ------------------------------------------------------------ public API
    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutputs of one request as tokens arrive; the last is finished.

        Raises ValueError for a bad prompt or parameters, including a prompt whose length
        plus max_tokens exceeds max_model_len, and EngineDeadError when the core is gone.
        """
        self.client.ensure_running()
        self.client.check_alive()
        arrival = time.monotonic()  # before tokenizing: TTFT and queue time include it
        text, ids = await self._process_inputs(prompt, sampling_params)
        if request_id in self.collectors:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        params = sampling_params
        collector = RequestOutputCollector(params.output_kind)
        self.collectors[request_id] = collector
        self.output_processor.add_request(request_id, text, ids, params,
                                          child_request_ids(request_id, params.best_of),
                                          arrival)
        finished = False
        try:
            self.client.add_request(EngineCoreRequest.make(
                request_id, ids, params, self.input_processor.eos_token_id, arrival,
                self.client_index))
            while not finished:
                output = await collector.get()
                finished = output.finished
                yield output
        finally:
            self.collectors.pop(request_id, None)
            if not finished:
                self.output_processor.abort(request_id)
                self.client.abort([request_id])

    async def _process_inputs(self, prompt: PromptType, params: SamplingParams
                              ) -> tuple[str | None, list[int]]:
        process = self.input_processor.process_inputs
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            return process(prompt, params, check_length=True) if len(ids) < 100_000 else \
                await asyncio.to_thread(process, prompt, params, None, None, True)
        text = prompt if isinstance(prompt, str) else (prompt or {}).get("prompt")
        if isinstance(text, str) and len(text) > THREAD_TOKENIZE_CHARS:
            return await asyncio.to_thread(process, prompt, params, None, None, True)
        return process(prompt, params, check_length=True)

    async def abort(self, request_id: str) -> None:
        """Finish a request now; a consumer still reading gets its final output."""
        final = self.output_processor.abort(request_id)
        self.client.abort([request_id])
        collector = self.collectors.get(request_id)
        if final is not None and collector is not None:
            collector.put(final)

    def get_stats(self) -> dict[str, Any]:
        """The engine's counters as of its last step (see `get_stats_async` for now)."""
        s = self.snapshot
        if s is None:
            return {"num_running": 0, "num_waiting": 0, "num_total_blocks": self.client.num_blocks}
        return {"num_running": s.num_running, "num_waiting": s.num_waiting,
                "num_total_blocks": s.num_total_blocks, "kv_cache_usage": s.kv_cache_usage,
                "prefix_cache_queries": s.prefix_cache_queries,
                "prefix_cache_hits": s.prefix_cache_hits, "num_preemptions": s.num_preemptions}

    async def get_stats_async(self) -> dict[str, Any]:
        """The engine core's counters, read between two of its steps."""
        return await self.client.call("get_stats")

    async def dashboard_view(self, max_cells: int) -> dict[str, Any]:
        """Queues and the KV block map, read in the core between two steps."""
        return await self.client.call("dashboard_view", max_cells)

    async def reset_prefix_cache(self) -> bool:
        return await self.client.call("reset_prefix_cache")

    @property
    def is_running(self) -> bool:
        try:
            self.client.check_alive()
        except EngineDeadError:
            return False
        return True

    async def check_health(self) -> None:
        self.client.check_alive()

    def shutdown(self) -> None:
        error = EngineDeadError("The engine has been shut down.")
        for collector in list(self.collectors.values()):
            collector.put(error)
        self.client.close()
        self._stop_core()

    def _stop_core(self) -> None:
        if self.core_process is not None:
            self.core_process.shutdown()
            self.core_process = None

    # ------------------------------------------------------------ outputs (event loop)
    def _on_outputs(self, msg: EngineCoreOutputs) -> None:
        if msg.snapshot is not None:
            self.snapshot = msg.snapshot
            if msg.iteration is not None and self.stat_loggers:
                self._record_stats(msg)
        if not msg.outputs:
            return
        outputs, stop_hits = self.output_processor.process(msg.outputs)
        if stop_hits:
            self.client.abort(stop_hits, reason="stop")
        collectors = self.collectors
        for out in outputs:
            collector = collectors.get(out.request_id)
            if collector is not None:
                collector.put(out)

    def _record_stats(self, msg: EngineCoreOutputs) -> None:
        assert msg.snapshot is not None and msg.iteration is not None
        now = time.monotonic()
        for stat_logger in list(self.stat_loggers):
            try:
                stat_logger.record(msg.snapshot, msg.iteration, now)
            except Exception:  # a faulty logger must not stop serving
                logger.exception("Stat logger %r failed; removing it", stat_logger)
                self.stat_loggers.remove(stat_logger)

    def _on_dead(self, error: EngineDeadError) -> None:
        for collector in list(self.collectors.values()):
            collector.put(error)
