"""AsyncPoolingEngine: an asyncio front for pooling (embedding) models, used by the server.

`PoolingEngine.encode` is synchronous; here it runs in a worker thread (`asyncio.to_thread`)
under a lock, so one batch runs at a time while the event loop keeps serving. The object
exposes what the OpenAI server needs of an engine, like `AsyncLLM`: `model_config`,
`tokenizer`, `get_stats()`, `check_health()` and `shutdown()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from pagedllm.config import EngineArgs, EngineConfig
from pagedllm.engine.input_processor import PromptType
from pagedllm.engine.pooling_engine import PoolingEngine
from pagedllm.outputs import PoolingRequestOutput
from pagedllm.pooling_params import PoolingParams


class AsyncPoolingEngine:
    """Serves embedding requests from asyncio code through one `PoolingEngine`."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = PoolingEngine(config)
        self.config = config
        self.model_config = config.model
        self.tokenizer: Any = self.engine.tokenizer
        # The longest input the pooling model accepts (may be below the config's value).
        self.max_model_len: int = int(self.engine.max_model_len)
        self.hidden_size: int = int(self.engine.hidden_size)
        self._lock = asyncio.Lock()
        self._running = 0
        self._waiting = 0
        self._closed = False

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> AsyncPoolingEngine:
        return cls(engine_args.create_engine_config(usage="server"))

    async def encode(
        self,
        prompts: Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
    ) -> list[PoolingRequestOutput]:
        """Pool `prompts` in a worker thread; raises ValueError for invalid inputs."""
        if self._closed:
            raise RuntimeError("The pooling engine has been shut down.")
        n = len(prompts)
        self._waiting += n
        started = False
        try:
            async with self._lock:
                self._waiting -= n
                started = True
                self._running += n
                try:
                    return await asyncio.to_thread(self.engine.encode, list(prompts),
                                                   pooling_params, False)
                finally:
                    self._running -= n
        finally:
            if not started:  # cancelled while queued
                self._waiting -= n

    def get_stats(self) -> dict[str, Any]:
        """The engine's counters plus the requests now running or queued here."""
        stats = self.engine.get_stats()
        stats["num_running"] = self._running
        stats["num_waiting"] = self._waiting
        return stats

    def is_running(self) -> bool:
        return not self._closed

    async def check_health(self) -> None:
        """Raise if the engine was shut down."""
        if self._closed:
            raise RuntimeError("The pooling engine has been shut down.")

    def shutdown(self) -> None:
        """Refuse further requests (the model is freed with the object)."""
        self._closed = True
