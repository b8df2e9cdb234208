"""Size limits on requests, checked before the work they would cause.

- Bodies over `--max-request-body-bytes` (default 8 MiB) get 413 from `BodySizeLimit`,
  before they are read in full or parsed: from `Content-Length` at once, or as soon as a
  chunked body passes the limit.
- Prompts of more than `PROMPT_LIMIT_FACTOR` x max_model_len tokens get 413 without being
  tokenized in full (`check_prompt_size`); shorter prompts that do not fit get the usual
  400 about the context length.
- `stop` lists are limited to `MAX_STOP_STRINGS` strings of at most `MAX_STOP_CHARS`.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedllm.entrypoints.openai.errors import RequestTooLargeError, error_json

DEFAULT_MAX_BODY_BYTES = 8 << 20
PROMPT_LIMIT_FACTOR = 4
# A text prompt this many characters per allowed token is tokenized only in part first.
_CHARS_PER_TOKEN_BOUND = 16
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024


class BodySizeLimit:
    """ASGI middleware: 413 for request bodies over `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _reply(self) -> Any:
        mib = self.max_bytes / (1 << 20)
        return error_json(
            f"The request body is larger than this server accepts ({self.max_bytes} bytes, "
            f"{mib:.1f} MiB); send a smaller request, or start the server with a larger "
            "--max-request-body-bytes.", 413)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    break
                if size > self.max_bytes:
                    await self._reply()(scope, receive, send)
                    return
                break
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # A body of unknown length (chunked): read it here, up to the limit, then replay it.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body = message.get("body", b"")
            received += len(body)
            if received > self.max_bytes:
                await self._reply()(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def prompt_token_limit(max_model_len: int) -> int:
    return PROMPT_LIMIT_FACTOR * max_model_len


def too_long(num_tokens: int, max_model_len: int, param: str) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"The prompt has {num_tokens} tokens or more, over {PROMPT_LIMIT_FACTOR} times this "
        f"model's maximum context length ({max_model_len} tokens); shorten it.", param=param)


def text_prefix_to_check(text: str, max_model_len: int) -> str | None:
    """The part of a very long text prompt to tokenize first (None: tokenize it all)."""
    bound = prompt_token_limit(max_model_len) * _CHARS_PER_TOKEN_BOUND
    return text[:bound] if len(text) > bound else None


def check_stop(stop: str | list[str] | None) -> None:
    from pagedllm.entrypoints.openai.errors import BadRequestError

    if stop is None or isinstance(stop, str):
        stop = [stop] if stop else []
    if len(stop) > MAX_STOP_STRINGS:
        raise BadRequestError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are "
                              "allowed.", param="stop")
    for item in stop:
        if isinstance(item, str) and len(item) > MAX_STOP_CHARS:
            raise BadRequestError(f"A stop string has {len(item)} characters; at most "
                                  f"{MAX_STOP_CHARS} are allowed.", param="stop")
