"""What completions, chat and tokenize share: prompt checks, SamplingParams, SSE, aborts.

The engine is used through the `AsyncLLM` interface only: `generate`, `abort`,
`model_config`, `tokenizer`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedllm.engine.logprobs import TokenBytes
from pagedllm.entrypoints.openai.errors import BadRequestError, OpenAIError, make_error
from pagedllm.entrypoints.openai.protocol import (
    ChatLogProbs,
    ChatLogProbToken,
    ChatLogProbTop,
    CompletionLogProbs,
    OpenAIBaseModel,
    _SamplingFields,
)
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.outputs import Logprob
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.utils import random_uuid

logger = logging.getLogger(__name__)

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"

# Request fields copied into SamplingParams when the client sets them (None = unset).
_SAMPLING_FIELDS = (
    "n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "bad_words",
    "ignore_eos", "min_tokens", "prompt_logprobs", "skip_special_tokens",
    "spaces_between_special_tokens", "include_stop_str_in_output", "logit_bias",
    "allowed_token_ids", "truncate_prompt_tokens",
)


@dataclass
class Prompt:
    """One tokenized prompt: its ids and (when known) its text."""

    token_ids: list[int]
    text: str | None = None


class ServerShuttingDown(OpenAIError):
    """In-flight generations end with this when the server drains for shutdown."""

    status_code = 503


class StreamRegistry:
    """The output queues of in-flight generations, so that shutdown can end them promptly.

    `drain()` (called when SIGINT/SIGTERM arrives) makes every running generation stop:
    streams send `finish_reason: "abort"` and `[DONE]`, other requests get a 503, and the
    engine requests are aborted, instead of being cut off at the graceful-shutdown timeout.
    """

    def __init__(self) -> None:
        self.draining = False
        self._queues: set[asyncio.Queue[Any]] = set()

    def register(self, queue: asyncio.Queue[Any]) -> None:
        if self.draining:
            raise ServerShuttingDown("The server is shutting down.")
        self._queues.add(queue)

    def unregister(self, queue: asyncio.Queue[Any]) -> None:
        self._queues.discard(queue)

    def drain(self) -> None:
        self.draining = True
        for queue in list(self._queues):
            queue.put_nowait(_DRAIN)

    def __len__(self) -> int:
        return len(self._queues)


_DRAIN = object()


class OpenAIServing:
    """Base of the endpoint handlers: owns the engine handle and the request checks."""

    request_id_prefix = "req"

    def __init__(self, engine: Any, models: OpenAIServingModels,
                 streams: StreamRegistry | None = None) -> None:
        self.engine = engine
        self.models = models
        self.streams = streams if streams is not None else StreamRegistry()
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len: int = int(self.model_config.max_model_len)
        vocab = getattr(self.model_config, "vocab_size", None)
        self.vocab_size: int = int(vocab) if isinstance(vocab, int) else len(self.tokenizer)
        self.max_logprobs: int = int(getattr(self.model_config, "max_logprobs", 20))
        self.token_bytes = TokenBytes(self.tokenizer)

    # ------------------------------------------------------------------ request checks
    def request_id(self, raw_request: Request | None, request: Any = None) -> str:
        """`<prefix>-<id>`: the client's X-Request-Id / request_id if given, else random."""
        given = getattr(request, "request_id", None)
        if not given and raw_request is not None:
            given = raw_request.headers.get("x-request-id")
        return f"{self.request_id_prefix}-{given or random_uuid()}"

    def log_ignored_fields(self, request: OpenAIBaseModel) -> None:
        ignored = request.ignored_fields()
        if ignored:
            logger.warning("Ignoring unknown request fields: %s", ", ".join(ignored))

    def check_common(self, request: _SamplingFields) -> str:
        """Checks shared by generation requests; returns the model name to report."""
        model_name = self.models.resolve(request.model)
        self.log_ignored_fields(request)
        if request.use_beam_search:
            raise BadRequestError("Beam search is not supported yet; set use_beam_search=false.",
                                  param="use_beam_search")
        fmt = request.response_format
        if fmt is not None and fmt.type != "text":
            raise BadRequestError(
                f"response_format type {fmt.type!r} (structured output) is not supported yet; "
                "use {\"type\": \"text\"}.", param="response_format")
        if request.logit_bias:
            for key in request.logit_bias:
                if not re.fullmatch(r"\d+", key.strip()):
                    raise BadRequestError(f"logit_bias keys must be token ids, got {key!r}.",
                                          param="logit_bias")
                self.check_token_id(int(key), "logit_bias")
        for name in ("allowed_token_ids", "stop_token_ids"):
            for tid in getattr(request, name) or ():
                self.check_token_id(tid, name)
        self.check_logprobs(request.prompt_logprobs, "prompt_logprobs")
        if request.stream and request.best_of is not None and request.best_of > request.n:
            raise BadRequestError("best_of > n cannot be streamed: the best samples are known "
                                  "only at the end. Set stream=false or best_of=n.",
                                  param="best_of")
        return model_name

    def check_logprobs(self, num: int | None, param: str) -> None:
        """At most --max-logprobs alternatives (-1 asks for the whole vocabulary)."""
        if num is None:
            return
        if num < -1:
            raise BadRequestError(f"{param} must be >= 0 (or -1 for the whole vocabulary), "
                                  f"got {num}.", param=param)
        if (self.vocab_size if num == -1 else num) > self.max_logprobs:
            raise BadRequestError(
                f"{param}={num} is more than this server allows (--max-logprobs "
                f"{self.max_logprobs}).", param=param)

    def check_token_id(self, token_id: int, param: str) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise BadRequestError(
                f"Token id {token_id} in {param} is out of range; the vocabulary has "
                f"{self.vocab_size} tokens (ids 0..{self.vocab_size - 1}).", param=param)

    # ------------------------------------------------------------------ prompts
    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def make_prompt(self, token_ids: list[int], text: str | None, param: str,
                    truncate: int | None = None) -> Prompt:
        """Check ids (non-empty, in vocabulary) and apply `truncate_prompt_tokens`."""
        if truncate is not None and truncate > 0 and len(token_ids) > truncate:
            token_ids = token_ids[-truncate:]
            text = None
        if not token_ids:
            raise BadRequestError("The prompt is empty; give at least one token.", param=param)
        for tid in token_ids:
            self.check_token_id(tid, param)
        return Prompt(token_ids=token_ids, text=text)

    def prompt_text(self, prompt: Prompt) -> str:
        """The prompt as text (decoded when the client sent token ids)."""
        if prompt.text is None:
            prompt.text = self.tokenizer.decode(prompt.token_ids)
        return prompt.text

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None,
                           param: str = "max_tokens") -> int:
        """Check prompt + max_tokens against max_model_len; fill a missing max_tokens."""
        if prompt_len >= self.max_model_len:
            raise BadRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your request has {prompt_len} input tokens, which leaves no room for output. "
                "Please reduce the length of the input.", param="prompt")
        if max_tokens is None:
            return self.max_model_len - prompt_len
        if max_tokens < 1:
            raise BadRequestError(f"{param} must be at least 1, got {max_tokens}.", param=param)
        if prompt_len + max_tokens > self.max_model_len:
            raise BadRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                f"{max_tokens} in the completion). Please reduce the length of the prompt or "
                f"of {param}.", param=param)
        return max_tokens

    # ------------------------------------------------------------------ sampling
    def sampling_params(self, request: _SamplingFields, *, max_tokens: int,
                        logprobs: int | None, stream: bool,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """SamplingParams from the request; its own checks become 400s."""
        kwargs: dict[str, Any] = {}
        for name in _SAMPLING_FIELDS:
            value = getattr(request, name, None)
            if value is not None:
                kwargs[name] = value
        kwargs["max_tokens"] = max_tokens
        if logprobs is not None:
            kwargs["logprobs"] = logprobs
        if prompt_logprobs is not None:
            kwargs["prompt_logprobs"] = prompt_logprobs
        kwargs["output_kind"] = (RequestOutputKind.DELTA if stream
                                 else RequestOutputKind.CUMULATIVE)
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as e:
            raise BadRequestError(str(e), param=_param_of(str(e), kwargs)) from e

    # ------------------------------------------------------------------ generation
    async def generate(self, prompt: Prompt, params: SamplingParams,
                       request_id: str) -> AsyncIterator[Any]:
        """The engine's output stream; engine ValueErrors (bad prompt) become 400s."""
        try:
            async for output in self.engine.generate(
                    {"prompt_token_ids": prompt.token_ids}, params, request_id):
                yield output
        except ValueError as e:
            raise BadRequestError(str(e)) from e

    def merge(self, *iterators: AsyncIterator[T]) -> AsyncIterator[tuple[int, T]]:
        """merge_async_iterators that also ends when the server drains for shutdown."""
        return merge_async_iterators(*iterators, registry=self.streams)

    async def abort(self, request_ids: list[str]) -> None:
        """Abort unfinished requests even while the caller is being cancelled."""
        if not request_ids:
            return
        with anyio.CancelScope(shield=True):
            for rid in request_ids:
                try:
                    await self.engine.abort(rid)
                except Exception:  # the engine may already have dropped it
                    logger.debug("abort(%s) failed", rid, exc_info=True)

    # ------------------------------------------------------------------ logprobs
    def token_str(self, token_id: int, logprob: Logprob | None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])

    def completion_logprobs(self, token_ids: list[int],
                            logprobs: list[dict[int, Logprob] | None] | None, num: int,
                            text_offset: int = 0) -> CompletionLogProbs | None:
        """OpenAI completions logprobs for tokens (None if the engine gave none); a None step
        (the first prompt token) has no logprob and no alternatives."""
        if logprobs is None:
            return None
        out = CompletionLogProbs()
        offset = text_offset
        for token_id, step in zip(token_ids, logprobs, strict=False):
            if step is None:
                token = self.token_str(token_id, None)
                out.tokens.append(token)
                out.token_logprobs.append(None)
                out.text_offset.append(offset)
                out.top_logprobs.append(None)
                offset += len(token)
                continue
            sampled = step.get(token_id)
            token = self.token_str(token_id, sampled)
            out.tokens.append(token)
            out.token_logprobs.append(json_logprob(sampled.logprob) if sampled else None)
            out.text_offset.append(offset)
            offset += len(token)
            top = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:max(num, 0)]
            out.top_logprobs.append(
                {self.token_str(tid, lp): json_logprob(lp.logprob) for tid, lp in top}
                if num > 0 else None)
        return out

    @staticmethod
    def prompt_logprobs(prompt_logprobs: list[dict[int, Logprob] | None] | None
                        ) -> list[dict[int, dict[str, Any]] | None] | None:
        """vLLM's `prompt_logprobs` field: per prompt token (None for the first one) a map
        token id -> {logprob, rank, decoded_token}."""
        if prompt_logprobs is None:
            return None
        return [None if step is None else {
            tid: {"logprob": json_logprob(lp.logprob), "rank": lp.rank,
                  "decoded_token": lp.decoded_token} for tid, lp in step.items()}
            for step in prompt_logprobs]

    def chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, Logprob]] | None,
                      num: int) -> ChatLogProbs | None:
        """OpenAI chat logprobs for generated tokens (None if the engine gave none)."""
        if logprobs is None:
            return None
        content: list[ChatLogProbToken] = []
        for token_id, step in zip(token_ids, logprobs, strict=False):
            sampled = step.get(token_id)
            token = self.token_str(token_id, sampled)
            top = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:max(num, 0)]
            content.append(ChatLogProbToken(
                token=token,
                logprob=json_logprob(sampled.logprob) if sampled else -9999.0,
                bytes=list(self.token_bytes(token_id)),
                top_logprobs=[
                    ChatLogProbTop(token=self.token_str(tid, lp),
                                   logprob=json_logprob(lp.logprob),
                                   bytes=list(self.token_bytes(tid)))
                    for tid, lp in top
                ],
            ))
        return ChatLogProbs(content=content)


def json_logprob(value: float) -> float:
    """A logprob JSON can carry: -inf (a token sampling excluded) becomes -9999.0."""
    return max(value, -9999.0)


def _param_of(message: str, fields: dict[str, Any]) -> str | None:
    """Guess the offending field from a SamplingParams error message ('top_p must be ...')."""
    match = re.match(r"\s*([a-z_]+)", message)
    if match and match.group(1) in fields:
        return match.group(1)
    return None


# ---------------------------------------------------------------------- streaming helpers
def sse(chunk: BaseModel, include_usage: bool = False) -> str:
    """One server-sent event carrying a JSON chunk.

    Like OpenAI: a chat `delta` lists only the fields it carries, and `usage` appears
    (as null until the last chunk) only when the client asked for it.
    """
    data = chunk.model_dump(mode="json")
    for choice in data.get("choices", ()):
        delta = choice.get("delta")
        if isinstance(delta, dict):
            choice["delta"] = {k: v for k, v in delta.items() if v is not None}
    if data.get("usage") is None and not include_usage:
        data.pop("usage", None)
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(exc: BaseException) -> str:
    """An error event sent in place of further chunks when a stream fails."""
    if isinstance(exc, OpenAIError):
        body = exc.to_response()
    else:
        body = make_error(f"Internal server error ({type(exc).__name__}); see the server log.",
                          500)
    return f"data: {body.model_dump_json()}\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its generator when it ends.

    Closing the generator (client gone, server shutting down) aborts the engine requests.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], **kwargs: Any) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, headers=headers, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


async def merge_async_iterators(
        *iterators: AsyncIterator[T],
        registry: StreamRegistry | None = None) -> AsyncIterator[tuple[int, T]]:
    """Yield `(index, item)` from several async iterators as items arrive.

    Each iterator is drained by its own task; when the consumer stops early, the tasks are
    cancelled, which closes the engine streams (and so aborts their requests). With a
    `registry`, `registry.drain()` makes this raise ServerShuttingDown.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue()
    if registry is not None:
        registry.register(queue)

    async def drain(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                await queue.put((index, item, None, False))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            queue.put_nowait((index, None, e, True))
            return
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except BaseException:
                    logger.debug("closing an engine stream failed", exc_info=True)
        queue.put_nowait((index, None, None, True))

    tasks = [asyncio.ensure_future(drain(i, it)) for i, it in enumerate(iterators)]
    remaining = len(tasks)
    try:
        while remaining:
            entry = await queue.get()
            if entry is _DRAIN:
                raise ServerShuttingDown("The server is shutting down; request aborted.")
            index, item, error, done = entry
            if error is not None:
                raise error
            if done:
                remaining -= 1
                continue
            yield index, item
    finally:
        if registry is not None:
            registry.unregister(queue)
        for task in tasks:
            task.cancel()


async def cancel_on_disconnect(raw_request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, cancelling it if the client disconnects first (returns None then)."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await raw_request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    logger.info("Client disconnected; request cancelled.")
    return None
