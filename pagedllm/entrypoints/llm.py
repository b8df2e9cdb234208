"""LLM: the offline Python API (`LLM(model).generate(prompts, SamplingParams(...))`)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedllm.config import EngineArgs
from pagedllm.engine.input_processor import PromptType, read_chat_template
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.utils import steady_gc

ChatMessage = dict[str, Any]

logger = logging.getLogger(__name__)

# "1": the engine core runs in a process of its own (as the server runs it, except on the
# CPU with one API server: a thread there, `engine/core_thread.py`); "0": in this process.
# In-process is the offline default on every device: see docs/ARCHITECTURE.md for the
# measurement behind it. The server reads the same variable (1: a core process, 0: a thread).
MULTIPROCESSING_ENV = "PAGEDLLM_ENABLE_MULTIPROCESSING"


def core_process_enabled() -> bool:
    """Whether `LLM` runs its engine core in its own process (PAGEDLLM_ENABLE_MULTIPROCESSING)."""
    value = os.environ.get(MULTIPROCESSING_ENV, "").strip().lower()
    if value in ("", "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise ValueError(f"{MULTIPROCESSING_ENV} must be 0 or 1 (got {value!r}).")


class LLM:
    """An engine for offline batched inference.

    `LLM()` with no model serves the embedded default model (SmolLM2-135M-Instruct).
    Keyword arguments are the engine arguments of vLLM (dtype, max_model_len, block_size,
    gpu_memory_utilization, enable_prefix_caching, device, ...).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        names = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(
                f"Unknown LLM argument(s): {', '.join(unknown)}. Valid arguments: "
                f"{', '.join(sorted(names - {'extra', 'model'}))}."
            )
        self.engine_args = EngineArgs(model=model, **kwargs)
        config = self.engine_args.create_engine_config()
        core_process = core_process_enabled()
        self.model_config = config.model
        if config.model.runner == "pooling":
            from pagedllm.engine.pooling_engine import PoolingEngine

            if core_process:
                logger.warning("%s=1 applies to generative models; this pooling model runs "
                               "in this process.", MULTIPROCESSING_ENV)
            self.engine: Any = PoolingEngine(config)
        else:
            from pagedllm.engine.llm_engine import LLMEngine

            self.engine = LLMEngine(config, core_process=core_process)
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    # ------------------------------------------------------------ generate
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate completions for one prompt or a batch; outputs come in input order."""
        if self.model_config.runner != "generate":
            raise ValueError(
                "This model was loaded as a pooling (embedding) model; use LLM.embed() or "
                "LLM.encode(), or load a generative model."
            )
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"Got {len(params_list)} SamplingParams for {len(prompts)} prompts; pass "
                    "one SamplingParams or exactly one per prompt."
                )
        return self._run(prompts, params_list, use_tqdm)

    def _run(self, prompts: list[PromptType], params_list: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                if not isinstance(params, SamplingParams):
                    raise ValueError("sampling_params must be SamplingParams objects.")
                params = params.clone()
                params.output_kind = RequestOutputKind.FINAL_ONLY
                rid = str(next(self._counter))
                self.engine.add_request(rid, prompt, params)
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        try:
            with steady_gc():
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished:
                            results[out.request_id] = out
                            bar.update(1)
        except BaseException:
            self.engine.abort_request([rid for rid in ids if rid not in results])
            raise
        finally:
            bar.close()
        return [results[rid] for rid in ids]

    # ------------------------------------------------------------ chat
    def chat(
        self,
        messages: list[ChatMessage] | list[list[ChatMessage]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Render conversations with the chat template, then generate.

        `chat_template` is Jinja text or a path to a template file; `tools` (OpenAI function
        tools) and `chat_template_kwargs` (e.g. ``{"enable_thinking": False}``) reach the
        template. Parse tool calls out of the outputs with a tool parser
        (`pagedllm.entrypoints.openai.tool_parsers`).
        """
        from pagedllm.entrypoints.chat_utils import render_chat

        conversations = (
            [messages] if messages and isinstance(messages[0], dict) else list(messages)
        )
        template = read_chat_template(chat_template) if chat_template else None
        if continue_final_message:
            add_generation_prompt = False
        prompts: list[PromptType] = [
            {"prompt_token_ids": render_chat(
                self.get_tokenizer(), conv, chat_template=template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tools=tools,
                chat_template_kwargs=chat_template_kwargs)}
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # ------------------------------------------------------------ pooling
    def encode(self, prompts: PromptType | Sequence[PromptType], pooling_params: Any = None,
               use_tqdm: bool = True) -> list[Any]:
        if self.model_config.runner != "pooling":
            raise ValueError(
                "encode()/embed() need a pooling model; load it with runner='pooling' (or an "
                "embedding model such as a sentence-transformers folder)."
            )
        with steady_gc():
            return self.engine.encode(prompts, pooling_params, use_tqdm=use_tqdm)

    def embed(self, prompts: PromptType | Sequence[PromptType], pooling_params: Any = None,
              use_tqdm: bool = True) -> list[Any]:
        from pagedllm.outputs import EmbeddingRequestOutput

        return [EmbeddingRequestOutput.from_base(o)
                for o in self.encode(prompts, pooling_params, use_tqdm)]

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def get_stats(self) -> dict[str, Any]:
        return self.engine.get_stats()
