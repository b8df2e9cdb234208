"""What completions, chat and tokenize share: prompt checks, SamplingParams, aborts.

The engine is used through the `AsyncLLM` interface only: `generate`, `abort`,
`model_config`, `tokenizer`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request

from pagedllm.engine.logprobs import TokenBytes
from pagedllm.entrypoints.openai.errors import BadRequestError
from pagedllm.entrypoints.openai.protocol import (
    ChatLogProbs,
    ChatLogProbToken,
    ChatLogProbTop,
    CompletionLogProbs,
    OpenAIBaseModel,
    _SamplingFields,
)
from pagedllm.entrypoints.openai.request_limits import (
    check_stop,
    prompt_token_limit,
    text_prefix_to_check,
    too_long,
)
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels
from pagedllm.entrypoints.openai.streaming import MergedStreams, StreamRegistry
from pagedllm.entrypoints.openai.structured_outputs import (
    GUIDED_FIELDS,
    structured_outputs_from_request,
)
from pagedllm.outputs import Logprob
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.structured_output import (
    StructuredOutputsConfig,
    StructuredOutputsParams,
    validate_structured_outputs,
)
from pagedllm.utils import random_uuid

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Chat messages longer than this many characters are rendered in a worker thread.
THREAD_TOKENIZE_CHARS = 20_000
# Prompts of this many characters or more are tokenized in a worker thread: the fast
# tokenizer's Rust encoder releases the GIL, so the event loop goes on streaming other
# requests' tokens meanwhile (and, on a machine with cores to spare, in parallel).
POOL_TOKENIZE_CHARS = 512

# vLLM request fields that this server does not implement: refused, never ignored.
UNSUPPORTED_FIELDS = {
    "guided_decoding_backend": "the backend is chosen per server: --structured-outputs-config",
    "return_token_ids": "token ids are not returned in responses",
    "return_tokens_as_token_ids": "token ids are not returned in responses",
    "kv_transfer_params": "KV transfer is not implemented",
    "vllm_xargs": "extra engine arguments are not implemented",
    "cache_salt": "prefix-cache salts are not implemented",
}

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
        config = getattr(engine, "config", None)
        self.structured_outputs_config: StructuredOutputsConfig = getattr(
            config, "structured_outputs", None) or StructuredOutputsConfig.parse(None)

    # ------------------------------------------------------------------ request checks
    def request_id(self, raw_request: Request | None, request: Any = None) -> str:
        """`<prefix>-<id>`: the client's X-Request-Id / request_id if given, else random."""
        given = getattr(request, "request_id", None)
        if not given and raw_request is not None:
            given = raw_request.headers.get("x-request-id")
        return f"{self.request_id_prefix}-{given or random_uuid()}"

    def log_ignored_fields(self, request: OpenAIBaseModel) -> None:
        """Refuse vLLM fields this server does not implement; log other unknown ones."""
        extra = request.ignored_fields()
        for name in extra:
            if name in UNSUPPORTED_FIELDS:
                raise BadRequestError(
                    f"{name} is not supported by this server ({UNSUPPORTED_FIELDS[name]}); "
                    "remove it from the request.", param=name)
        if extra:
            logger.warning("Ignoring unknown request fields: %s", ", ".join(extra))

    def check_common(self, request: _SamplingFields) -> str:
        """Checks shared by generation requests; returns the model name to report."""
        model_name = self.models.resolve(request.model)
        self.log_ignored_fields(request)
        check_stop(request.stop)
        if request.seed is not None and not -(1 << 63) <= request.seed < (1 << 63):
            raise BadRequestError(f"seed must fit in a signed 64-bit integer, got {request.seed}.",
                                  param="seed")
        if request.use_beam_search:
            raise BadRequestError("Beam search is not supported yet; set use_beam_search=false.",
                                  param="use_beam_search")
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

    async def tokenize_prompt(self, text: str, add_special_tokens: bool,
                              param: str = "prompt") -> list[int]:
        """Token ids of a prompt, off the event loop when it is long; 413 for a prompt far
        over max_model_len, found without tokenizing all of it."""
        if len(text) < POOL_TOKENIZE_CHARS:
            ids = self.tokenize(text, add_special_tokens)
        elif len(text) < THREAD_TOKENIZE_CHARS:
            ids = await asyncio.to_thread(self.tokenize, text, add_special_tokens)
        else:
            prefix = text_prefix_to_check(text, self.max_model_len)
            if prefix is not None:
                head = await asyncio.to_thread(self.tokenize, prefix, add_special_tokens)
                if len(head) > prompt_token_limit(self.max_model_len):
                    raise too_long(len(head), self.max_model_len, param)
            ids = await asyncio.to_thread(self.tokenize, text, add_special_tokens)
        self.check_prompt_size(len(ids), param)
        return ids

    def check_prompt_size(self, num_tokens: int, param: str) -> None:
        if num_tokens > prompt_token_limit(self.max_model_len):
            raise too_long(num_tokens, self.max_model_len, param)

    def make_prompt(self, token_ids: list[int], text: str | None, param: str,
                    truncate: int | None = None) -> Prompt:
        """Check ids (non-empty, in vocabulary) and apply `truncate_prompt_tokens`."""
        if truncate is not None and truncate > 0 and len(token_ids) > truncate:
            token_ids = token_ids[-truncate:]
            text = None
        if not token_ids:
            raise BadRequestError("The prompt is empty; give at least one token.", param=param)
        if min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
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
        so, backend = self.structured_outputs(request)
        if so is not None:
            kwargs["structured_outputs"] = so
        try:
            params = SamplingParams(**kwargs)
        except (ValueError, TypeError) as e:
            raise BadRequestError(str(e), param=_param_of(str(e), kwargs)) from e
        params._structured_outputs_backend = backend
        return params

    def structured_outputs(self, request: Any) -> tuple[StructuredOutputsParams | None,
                                                        str | None]:
        """The request's constraint (response_format, structured_outputs or guided_*) and the
        backend that takes it; a bad one is a 400 with the backend's diagnosis."""
        try:
            so = structured_outputs_from_request(request)
            if so is None:
                return None, None
            return so, validate_structured_outputs(so, self.structured_outputs_config)
        except ValueError as e:
            raise BadRequestError(str(e), param=_structured_param(request)) from e

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

    def merge(self, *iterators: AsyncIterator[T]) -> MergedStreams[T]:
        """The engine streams merged, registered for draining at shutdown."""
        return MergedStreams(*iterators, registry=self.streams)

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
            # The sampled (or echoed) token is always listed, as in vLLM, then the `num`
            # most likely ones.
            top = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:max(num, 0)]
            entries = {token: json_logprob(sampled.logprob)} if sampled else {}
            for tid, lp in top:
                entries.setdefault(self.token_str(tid, lp), json_logprob(lp.logprob))
            out.top_logprobs.append(entries)
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


def _structured_param(request: Any) -> str:
    """The request field that carries its structured-output constraint."""
    extra = getattr(request, "model_extra", None) or {}
    for name in ("response_format", "structured_outputs", *GUIDED_FIELDS):
        value = getattr(request, name, None)
        if value is None:
            value = extra.get(name)
        if value is not None and not (name == "response_format"
                                      and getattr(value, "type", None) == "text"):
            return name
    return "structured_outputs"
