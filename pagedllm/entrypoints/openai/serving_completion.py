"""POST /v1/completions: prompts as text or token ids, streaming or not, n, echo."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.entrypoints.openai.errors import BadRequestError
from pagedllm.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing, Prompt
from pagedllm.entrypoints.openai.sse_chunks import ChunkEncoder
from pagedllm.entrypoints.openai.streaming import (
    SSEResponse,
    cancel_on_disconnect,
    finish_stream,
    sse,
)
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class OpenAIServingCompletion(OpenAIServing):
    """Turns a CompletionRequest into engine requests (one per prompt) and back."""

    request_id_prefix = "cmpl"

    async def create_completion(self, request: CompletionRequest,
                                raw_request: Request | None = None) -> Response:
        model_name = self.check_common(request)
        if request.suffix is not None:
            raise BadRequestError("suffix is not supported.", param="suffix")
        self.check_logprobs(request.logprobs, "logprobs")
        prompts = await self._prompts(request)
        stream = bool(request.stream)
        prompt_logprobs = request.prompt_logprobs
        if request.echo and request.logprobs is not None:  # echoed tokens get logprobs too
            prompt_logprobs = max(prompt_logprobs or 0, request.logprobs)
        params = [
            self.sampling_params(
                request,
                max_tokens=self.resolve_max_tokens(len(p.token_ids), request.max_tokens),
                logprobs=request.logprobs,
                stream=stream,
                prompt_logprobs=prompt_logprobs,
            )
            for p in prompts
        ]
        request_id = self.request_id(raw_request, request)
        engine_ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        created = int(time.time())
        if stream:
            return SSEResponse(await self._stream(request, model_name, request_id, created,
                                                  prompts, params, engine_ids))
        work = self._full(request, model_name, request_id, created, prompts, params, engine_ids)
        response = await (cancel_on_disconnect(raw_request, work) if raw_request else work)
        if response is None:  # client went away
            return Response(status_code=499)
        return JSONResponse(response.model_dump(mode="json"))

    # ------------------------------------------------------------------ prompts
    async def _prompts(self, request: CompletionRequest) -> list[Prompt]:
        raw = request.prompt
        truncate = request.truncate_prompt_tokens
        if isinstance(raw, str):
            items: list[Any] = [raw]
        elif not raw:
            raise BadRequestError("prompt must not be empty.", param="prompt")
        elif all(isinstance(x, int) for x in raw):
            items = [raw]
        else:
            items = list(raw)
        prompts = []
        for item in items:
            if isinstance(item, str):
                ids = await self.tokenize_prompt(item, request.add_special_tokens)
                prompts.append(self.make_prompt(ids, item, "prompt", truncate))
            else:
                self.check_prompt_size(len(item), "prompt")
                prompts.append(self.make_prompt(list(item), None, "prompt", truncate))
        return prompts

    def _text(self, request: CompletionRequest, prompt: Prompt, text: str) -> str:
        return self.prompt_text(prompt) + text if request.echo else text

    def _logprobs(self, request: CompletionRequest, prompt: Prompt, prompt_logprobs: Any,
                  out: Any, text_offset: int = 0) -> CompletionLogProbs | None:
        """Logprobs of a choice (or of its first chunk): with echo, the prompt's tokens
        come first (the very first one without a logprob, as in OpenAI)."""
        if request.logprobs is None:
            return None
        if request.echo and prompt_logprobs is not None:
            return self.completion_logprobs(
                prompt.token_ids + out.token_ids, prompt_logprobs + (out.logprobs or []),
                request.logprobs, text_offset)
        return self.completion_logprobs(out.token_ids, out.logprobs, request.logprobs,
                                        text_offset)

    # ------------------------------------------------------------------ non-streaming
    async def _full(self, request: CompletionRequest, model_name: str, request_id: str,
                    created: int, prompts: list[Prompt], params: list[SamplingParams],
                    engine_ids: list[str]) -> CompletionResponse:
        finals: list[Any] = [None] * len(prompts)
        unfinished = set(engine_ids)
        streams = [self.generate(p, sp, rid) for p, sp, rid in zip(prompts, params, engine_ids,
                                                                   strict=True)]
        try:
            async for i, output in self.merge(*streams):
                finals[i] = output
                if output.finished:
                    unfinished.discard(engine_ids[i])
        finally:
            await self.abort(sorted(unfinished))

        choices: list[CompletionResponseChoice] = []
        prompt_tokens = completion_tokens = 0
        for i, (prompt, final) in enumerate(zip(prompts, finals, strict=True)):
            if final is None:
                raise RuntimeError(f"The engine returned no output for request {engine_ids[i]}.")
            prompt_tokens += len(final.prompt_token_ids or prompt.token_ids)
            prompt_logprobs = (self.prompt_logprobs(final.prompt_logprobs)
                               if request.prompt_logprobs is not None else None)
            for out in sorted(final.outputs, key=lambda o: o.index):
                completion_tokens += len(out.token_ids)
                choices.append(CompletionResponseChoice(
                    index=i * request.n + out.index,
                    text=self._text(request, prompt, out.text),
                    logprobs=self._logprobs(
                        request, prompt, final.prompt_logprobs, out,
                        len(self.prompt_text(prompt))
                        if request.echo and final.prompt_logprobs is None else 0),
                    finish_reason=out.finish_reason,
                    stop_reason=out.stop_reason,
                    prompt_logprobs=prompt_logprobs,
                ))
        return CompletionResponse(
            id=request_id,
            created=created,
            model=model_name,
            choices=choices,
            usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens),
        )

    # ------------------------------------------------------------------ streaming
    async def _stream(self, request: CompletionRequest, model_name: str, request_id: str,
                      created: int, prompts: list[Prompt], params: list[SamplingParams],
                      engine_ids: list[str]) -> AsyncIterator[str]:
        """The SSE chunks of a streamed completion (its engine streams are registered
        for draining before the response starts)."""
        n = request.n
        num_choices = len(prompts) * n
        finished = [False] * num_choices
        echoed = [False] * num_choices
        # Where each choice's next token starts in its text (as the non-streamed
        # text_offset counts it: token by token, also while a stop string holds text back).
        next_offset = [0] * num_choices
        completion_tokens = [0] * num_choices
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(include_usage and options and options.continuous_usage_stats)
        unfinished = set(engine_ids)

        def usage() -> UsageInfo:
            done = sum(completion_tokens)
            return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=done,
                             total_tokens=prompt_tokens + done)

        fast = ChunkEncoder("text_completion", request_id, created, model_name, include_usage)

        def chunk(idx: int, text: str, logprobs: CompletionLogProbs | None = None,
                  **fields: Any) -> str:
            if logprobs is None and not continuous:
                return fast.text(idx, text, **fields)
            return sse(CompletionStreamResponse(
                id=request_id, created=created, model=model_name,
                choices=[CompletionResponseStreamChoice(index=idx, text=text, logprobs=logprobs,
                                                        **fields)],
                usage=usage() if continuous else None), include_usage)

        merged = self.merge(*(self.generate(p, sp, rid) for p, sp, rid in
                              zip(prompts, params, engine_ids, strict=True)))

        async def chunks() -> AsyncIterator[str]:
            async for i, output in merged:
                if output.finished:
                    unfinished.discard(engine_ids[i])
                for out in output.outputs:
                    idx = i * n + out.index
                    if finished[idx]:
                        continue
                    text = out.text
                    prompt_logprobs = None
                    if request.echo and not echoed[idx]:
                        text = self.prompt_text(prompts[i]) + text
                        prompt_logprobs = output.prompt_logprobs
                        echoed[idx] = True
                        if prompt_logprobs is None:
                            next_offset[idx] = len(self.prompt_text(prompts[i]))
                    completion_tokens[idx] += len(out.token_ids)
                    if not text and not out.token_ids and out.finish_reason is None:
                        continue
                    logprobs = self._logprobs(request, prompts[i], prompt_logprobs, out,
                                              next_offset[idx])
                    if logprobs is not None and logprobs.tokens:
                        next_offset[idx] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                    yield chunk(idx, text, logprobs=logprobs, finish_reason=out.finish_reason,
                                stop_reason=out.stop_reason)
                    if out.finish_reason is not None:
                        finished[idx] = True

        def usage_chunk() -> str | None:
            if not include_usage:
                return None
            return sse(CompletionStreamResponse(id=request_id, created=created,
                                                model=model_name, choices=[], usage=usage()),
                       include_usage)

        async def close() -> None:
            await merged.aclose()
            await self.abort(sorted(unfinished))

        return finish_stream(
            chunks(), label=request_id, usage_chunk=usage_chunk, on_close=close,
            abort_chunks=lambda: [chunk(idx, "", finish_reason="abort")
                                  for idx in range(num_choices) if not finished[idx]])
