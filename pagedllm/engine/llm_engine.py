"""LLMEngine: the offline engine, a front-end over an `EngineCore`: in this process (the
default), or in a process of its own as the server runs it (`core_process=True`, which
`LLM` takes from `PAGEDLLM_ENABLE_MULTIPROCESSING=1`)."""

from __future__ import annotations

import time
from typing import Any

from pagedllm.config import EngineArgs, EngineConfig
from pagedllm.engine.core import EngineCore
from pagedllm.engine.core_client import SyncCoreClient
from pagedllm.engine.input_processor import InputProcessor, PromptType
from pagedllm.engine.messages import child_request_ids
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.scheduler import Scheduler
from pagedllm.metrics.stats import StatsCollector
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams


class LLMEngine:
    """Accepts requests, steps an `EngineCore`, and returns RequestOutputs.

    The front-end half (tokenizing, checking params, detokenizing, stop strings) is the
    same as the server's (`AsyncLLM`). With `core_process`, the core runs in its own
    process and `step()` returns what its steps produced meanwhile."""

    def __init__(self, config: EngineConfig, core_process: bool = False) -> None:
        self.config = config
        self.model_config = config.model
        self.frontend = InputProcessor(config)
        self.tokenizer = self.frontend.tokenizer
        self.core: EngineCore | SyncCoreClient = (
            SyncCoreClient(config) if core_process else EngineCore(config))
        self.output_processor = OutputProcessor(self.tokenizer)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        return cls(engine_args.create_engine_config())

    # The in-process core's parts, for tests and tools that look inside a running engine.
    @property
    def scheduler(self) -> Scheduler:
        return self._local_core().scheduler

    @property
    def executor(self) -> Any:
        return self._local_core().executor

    @property
    def num_blocks(self) -> int:
        return self.core.num_blocks

    @property
    def stats(self) -> StatsCollector:
        return self._local_core().stats

    def _local_core(self) -> EngineCore:
        if not isinstance(self.core, EngineCore):
            raise AttributeError("The engine core runs in its own process "
                                 "(PAGEDLLM_ENABLE_MULTIPROCESSING=1); its parts are not here.")
        return self.core

    # ------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None,
                    prompt_token_ids: list[int] | None = None,
                    prompt_text: str | None = None) -> None:
        """Queue a request (n > 1 becomes n child sequences sharing the prompt's blocks)."""
        if request_id in self.output_processor.parents:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        prompt_text, prompt_token_ids = self.frontend.process_inputs(
            prompt, params, prompt_token_ids, prompt_text)  # TTFT includes tokenizing
        child_ids = child_request_ids(request_id, params.best_of or params.n)
        self.output_processor.add_request(request_id, prompt_text, prompt_token_ids, params,
                                          child_ids, arrival)
        self.core.add(request_id, prompt_token_ids, params, self.frontend.eos_token_id,
                      arrival)

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        """Stop requests now and free their KV blocks; returns their final outputs
        (finish_reason "abort" for sequences that had not finished)."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        self.core.abort(list(request_ids))
        finals = []
        for rid in request_ids:
            final = self.output_processor.abort(rid)
            if final is not None:
                finals.append(final)
        return finals

    def has_unfinished_requests(self) -> bool:
        if isinstance(self.core, EngineCore):
            return self.core.has_unfinished_requests()
        return bool(self.output_processor.parents)  # what the front-end still waits for

    # ------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Run one core step and return the outputs of requests that progressed."""
        outputs, stop_hits = self.output_processor.process(self.core.step())
        if stop_hits:
            self.core.abort(stop_hits, reason="stop")
        return outputs

    def get_stats(self) -> dict[str, Any]:
        return self.core.get_stats()

    def reset_prefix_cache(self) -> bool:
        return self.core.reset_prefix_cache()

    def shutdown(self) -> None:
        self.core.shutdown()
