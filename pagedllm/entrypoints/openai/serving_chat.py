"""POST /v1/chat/completions: messages rendered by the chat template, streaming or not."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.entrypoints.chat_utils import ChatInputError
from pagedllm.entrypoints.openai.chat_output import ChatOutputParser
from pagedllm.entrypoints.openai.chat_utils import message_text, render_chat
from pagedllm.entrypoints.openai.errors import BadRequestError
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessageOut,
    DeltaMessage,
    UsageInfo,
)
from pagedllm.entrypoints.openai.reasoning.base import ReasoningParser
from pagedllm.entrypoints.openai.serving_base import (
    THREAD_TOKENIZE_CHARS,
    OpenAIServing,
    Prompt,
)
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.entrypoints.openai.sse_chunks import ChunkEncoder
from pagedllm.entrypoints.openai.streaming import (
    SSEResponse,
    StreamRegistry,
    cancel_on_disconnect,
    finish_stream,
    sse,
)
from pagedllm.entrypoints.openai.tool_choice import (
    ToolChoice,
    constrained_output_parser,
    resolve_tool_choice,
    tool_choice_json_schema,
)
from pagedllm.entrypoints.openai.tool_parsers.base import ToolParser
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output import StructuredOutputsParams, validate_structured_outputs

logger = logging.getLogger(__name__)


class OpenAIServingChat(OpenAIServing):
    """Renders the conversation, runs one engine request (n choices) and shapes the reply."""

    request_id_prefix = "chatcmpl"

    def __init__(self, engine: Any, models: OpenAIServingModels,
                 chat_template: str | None = None,
                 streams: StreamRegistry | None = None,
                 tool_parser: type[ToolParser] | None = None,
                 reasoning_parser: type[ReasoningParser] | None = None) -> None:
        super().__init__(engine, models, streams)
        self.chat_template = chat_template
        # --enable-auto-tool-choice --tool-call-parser NAME / --reasoning-parser NAME
        self.tool_parser = tool_parser
        self.reasoning_parser = reasoning_parser

    def tool_choice(self, request: ChatCompletionRequest) -> ToolChoice:
        """The request's resolved tool_choice; 400 for a bad one."""
        given = request.tool_choice if "tool_choice" in request.model_fields_set else None
        try:
            return resolve_tool_choice(given, request.tools, request.parallel_tool_calls,
                                       auto_enabled=self.tool_parser is not None)
        except ChatInputError as e:
            raise BadRequestError(str(e), param=e.param) from e

    def output_parser(self, request: ChatCompletionRequest, prompt_text: str,
                      constrained: bool = False) -> ChatOutputParser | None:
        """The request's reasoning / tool-call parsers (None when it needs neither); 400s
        for a bad or unsupported tool_choice. Output held to the tools' schemas (tool_choice
        required or naming a function) is read by the matching constrained parser.

        A `constrained` output (structured outputs, from its first token) is all answer: the
        reasoning parser does not apply to it."""
        choice = self.tool_choice(request)
        if choice.mode in ("required", "function"):
            tools = constrained_output_parser(choice, request.tools, self.tokenizer)
        elif choice.mode == "auto" and self.tool_parser is not None:
            tools = self.tool_parser(self.tokenizer, request.tools)
        else:
            tools = None
        reasoning = (self.reasoning_parser(self.tokenizer, prompt_text)
                     if self.reasoning_parser is not None and not constrained else None)
        if tools is None and reasoning is None:
            return None
        return ChatOutputParser(reasoning, tools, choice.max_calls)

    def constrain_tool_calls(self, request: ChatCompletionRequest,
                             params: SamplingParams) -> None:
        """tool_choice required / a named function: structured outputs hold the output to
        a call list (or the function's arguments) that validates against the tools'
        parameter schemas."""
        choice = self.tool_choice(request)
        schema = tool_choice_json_schema(choice, request.tools)
        if schema is None:
            return
        if params.structured_outputs is not None:
            raise BadRequestError("tool_choice 'required' or naming a function constrains the "
                                  "output to the tools' schemas; it cannot be combined with "
                                  "response_format or structured outputs.", param="tool_choice")
        try:
            so = StructuredOutputsParams(json=schema)
            backend = validate_structured_outputs(so, self.structured_outputs_config)
        except ValueError as e:
            raise BadRequestError(f"The tools' parameter schemas cannot be enforced: {e}",
                                  param="tools") from e
        params.structured_outputs = so
        params._structured_outputs_backend = backend

    def render(self, request: Any) -> str:
        """The prompt text of a chat (or chat tokenize) request."""
        return render_chat(
            self.tokenizer,
            request.messages,
            chat_template=request.chat_template or self.chat_template,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            tools=request.tools,
            documents=request.documents,
            chat_template_kwargs=request.chat_template_kwargs,
        )

    async def create_chat_completion(self, request: ChatCompletionRequest,
                                     raw_request: Request | None = None) -> Response:
        model_name = self.check_common(request)
        self.output_parser(request, "")  # the tool_choice checks, before any work
        if request.top_logprobs is not None and request.top_logprobs < 0:
            raise BadRequestError(f"top_logprobs must be >= 0, got {request.top_logprobs}.",
                                  param="top_logprobs")
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        self.check_logprobs(num_logprobs, "top_logprobs")
        if sum(_content_chars(m) for m in request.messages) > THREAD_TOKENIZE_CHARS:
            text = await asyncio.to_thread(self.render, request)
        else:
            text = self.render(request)
        ids = await self.tokenize_prompt(text, request.add_special_tokens, "messages")
        prompt = self.make_prompt(ids, text, "messages", request.truncate_prompt_tokens)
        if request.max_completion_tokens is not None:
            max_tokens, param = request.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param = request.max_tokens, "max_tokens"
        stream = bool(request.stream)
        params = self.sampling_params(
            request,
            max_tokens=self.resolve_max_tokens(len(prompt.token_ids), max_tokens, param),
            logprobs=num_logprobs,
            stream=stream,
        )
        self.constrain_tool_calls(request, params)
        parser = self.output_parser(request, text,
                                    constrained=params.structured_outputs is not None)
        if parser is not None and parser.needs_special_tokens:
            params.skip_special_tokens = False  # the format's markers are special tokens
        role = "assistant" if request.add_generation_prompt else request.messages[-1].role
        echo = ""
        if request.echo and request.messages[-1].role == role:
            echo = message_text(request.messages[-1])
        request_id = self.request_id(raw_request, request)
        created = int(time.time())
        if stream:
            return SSEResponse(await self._stream(request, model_name, request_id, created,
                                                  prompt, params, role, echo, parser))
        work = self._full(request, model_name, request_id, created, prompt, params, role, echo,
                          parser)
        response = await (cancel_on_disconnect(raw_request, work) if raw_request else work)
        if response is None:  # client went away
            return Response(status_code=499)
        return JSONResponse(response.model_dump(mode="json"))

    # ------------------------------------------------------------------ non-streaming
    async def _full(self, request: ChatCompletionRequest, model_name: str, request_id: str,
                    created: int, prompt: Prompt, params: SamplingParams, role: str,
                    echo: str, parser: ChatOutputParser | None) -> ChatCompletionResponse:
        final = None
        merged = self.merge(self.generate(prompt, params, request_id))
        try:
            async for _, output in merged:
                final = output
        finally:
            await merged.aclose()
            if final is None or not final.finished:
                await self.abort([request_id])
        if final is None:
            raise RuntimeError(f"The engine returned no output for request {request_id}.")
        choices = []
        completion_tokens = 0
        for out in sorted(final.outputs, key=lambda o: o.index):
            completion_tokens += len(out.token_ids)
            finish_reason = out.finish_reason
            if parser is None:
                message = ChatMessageOut(role=role, content=echo + out.text)
            else:
                parsed = parser.parse(echo + out.text)
                message = ChatMessageOut(
                    role=role, content=parsed.content, reasoning_content=parsed.reasoning,
                    reasoning=parsed.reasoning,
                    tool_calls=[c.to_openai() for c in parsed.tool_calls])
                finish_reason = parsed.finish_reason(finish_reason)
            choices.append(ChatCompletionResponseChoice(
                index=out.index,
                message=message,
                logprobs=(self.chat_logprobs(out.token_ids, out.logprobs,
                                             request.top_logprobs or 0)
                          if request.logprobs else None),
                finish_reason=finish_reason,
                stop_reason=out.stop_reason,
            ))
        prompt_tokens = len(final.prompt_token_ids or prompt.token_ids)
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=model_name,
            choices=choices,
            usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens),
            prompt_logprobs=self.prompt_logprobs(final.prompt_logprobs),
        )

    # ------------------------------------------------------------------ streaming
    async def _stream(self, request: ChatCompletionRequest, model_name: str, request_id: str,
                      created: int, prompt: Prompt, params: SamplingParams, role: str,
                      echo: str, parser: ChatOutputParser | None) -> AsyncIterator[str]:
        """The SSE chunks of a streamed chat completion (its engine stream is registered
        for draining before the response starts)."""
        n = request.n
        finished = [False] * n
        completion_tokens = [0] * n
        prompt_tokens = len(prompt.token_ids)
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(include_usage and options and options.continuous_usage_stats)
        done = False

        def usage() -> UsageInfo:
            total = sum(completion_tokens)
            return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=total,
                             total_tokens=prompt_tokens + total)

        fast = ChunkEncoder("chat.completion.chunk", request_id, created, model_name,
                            include_usage)

        def chunk(index: int, delta: DeltaMessage, **fields: Any) -> str:
            if (not continuous and fields.get("logprobs") is None and delta.role is None
                    and delta.reasoning_content is None and delta.reasoning is None
                    and delta.tool_calls is None):
                return fast.content(index, delta.content, fields.get("finish_reason"),
                                    fields.get("stop_reason"))
            return sse(ChatCompletionStreamResponse(
                id=request_id, created=created, model=model_name,
                choices=[ChatCompletionResponseStreamChoice(index=index, delta=delta, **fields)],
                usage=usage() if continuous else None,
            ), include_usage)

        merged = self.merge(self.generate(prompt, params, request_id))

        parsed = [parser.stream() for _ in range(n)] if parser is not None else None

        def delta_of(i: int, text: str, final: bool) -> DeltaMessage | None:
            """The choice's delta; with parsers, what they let through (None: nothing)."""
            if parsed is None:
                return DeltaMessage(content=text)
            d = parsed[i].feed(text, final)
            if d is None:
                return None
            return DeltaMessage(content=d.content, reasoning_content=d.reasoning,
                                reasoning=d.reasoning,
                                tool_calls=[c.to_openai() for c in d.tool_calls] or None)

        async def chunks() -> AsyncIterator[str]:
            nonlocal done
            for i in range(n):
                yield chunk(i, DeltaMessage(role=role, content=""))
                if echo:
                    first = delta_of(i, echo, False)
                    if first is not None:
                        yield chunk(i, first)
            async for _, output in merged:
                done = output.finished
                for out in output.outputs:
                    i = out.index
                    if finished[i]:
                        continue
                    completion_tokens[i] += len(out.token_ids)
                    if not out.text and not out.token_ids and out.finish_reason is None:
                        continue
                    logprobs = None
                    if request.logprobs:
                        logprobs = self.chat_logprobs(out.token_ids, out.logprobs,
                                                      request.top_logprobs or 0)
                    final = out.finish_reason is not None
                    delta = delta_of(i, out.text, final)
                    if delta is None and not final and logprobs is None:
                        continue  # held back by a parser (e.g. a call's start)
                    finish_reason = (parsed[i].finish_reason(out.finish_reason)
                                     if parsed is not None else out.finish_reason)
                    yield chunk(i, delta or DeltaMessage(), logprobs=logprobs,
                                finish_reason=finish_reason, stop_reason=out.stop_reason)
                    if out.finish_reason is not None:
                        finished[i] = True

        def usage_chunk() -> str | None:
            if not include_usage:
                return None
            return sse(ChatCompletionStreamResponse(id=request_id, created=created,
                                                   model=model_name, choices=[],
                                                   usage=usage()), include_usage)

        async def close() -> None:
            await merged.aclose()
            if not done:
                await self.abort([request_id])

        return finish_stream(
            chunks(), label=request_id, usage_chunk=usage_chunk, on_close=close,
            abort_chunks=lambda: [chunk(i, DeltaMessage(), finish_reason="abort")
                                  for i in range(n) if not finished[i]])


def _content_chars(message: Any) -> int:
    """Characters of a message's text (unchecked: the renderer checks the messages)."""
    content = getattr(message, "content", None)
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(getattr(part, "text", None) or "") for part in content)
    return 0
