"""Server-sent events: chunk encoding, the response class, the registry of in-flight
generations (drained at shutdown), merging several engine streams, and the one finaliser
that every streamed endpoint ends through (usage chunk, abort, error event, `[DONE]`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedllm.entrypoints.openai.errors import OpenAIError, make_error

logger = logging.getLogger(__name__)

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


class ServerShuttingDown(OpenAIError):
    """In-flight generations end with this when the server drains for shutdown."""

    status_code = 503


class StreamRegistry:
    """The in-flight generations, so that shutdown can end them promptly.

    `drain()` (called when SIGINT/SIGTERM arrives) makes every running generation stop:
    streams send `finish_reason: "abort"` and `[DONE]`, other requests get a 503, and the
    engine requests are aborted, instead of being cut off at the graceful-shutdown timeout.
    """

    def __init__(self) -> None:
        self.draining = False
        self._generations: set[Callable[[], None]] = set()

    def register(self, on_drain: Callable[[], None]) -> None:
        """Add a generation; `on_drain()` (called on the event loop) must make it stop."""
        if self.draining:
            raise ServerShuttingDown("The server is shutting down.")
        self._generations.add(on_drain)

    def unregister(self, on_drain: Callable[[], None]) -> None:
        self._generations.discard(on_drain)

    def drain(self) -> None:
        self.draining = True
        for on_drain in list(self._generations):
            on_drain()

    def __len__(self) -> int:
        return len(self._generations)


_DRAIN = object()


# ---------------------------------------------------------------------- encoding
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
    elif type(exc).__name__ == "EngineDeadError":
        body = make_error(str(exc), 500)
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


# ---------------------------------------------------------------------- the finaliser
async def finish_stream(chunks: AsyncIterator[str], *, label: str,
                        usage_chunk: Callable[[], str | None],
                        abort_chunks: Callable[[], Iterable[str]],
                        on_close: Callable[[], Awaitable[None]]) -> AsyncIterator[str]:
    """Every streamed endpoint's ending: `chunks`, then the usage chunk (when asked for);
    on shutdown the unfinished choices' `finish_reason: "abort"` chunks first; on an error
    an OpenAI-shaped error event; then `on_close()` (aborts what is still running) and
    `[DONE]`."""
    try:
        async for chunk in chunks:
            yield chunk
        tail = usage_chunk()
        if tail:
            yield tail
    except ServerShuttingDown:
        for chunk in abort_chunks():
            yield chunk
        tail = usage_chunk()
        if tail:
            yield tail
    except Exception as e:
        if not isinstance(e, OpenAIError) and type(e).__name__ != "EngineDeadError":
            logger.exception("Stream %s failed", label)
        yield sse_error(e)
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        await on_close()
    yield SSE_DONE


# ---------------------------------------------------------------------- engine streams
class MergedStreams(AsyncIterator[tuple[int, T]]):
    """`(index, item)` from several async iterators as items arrive.

    Each iterator is drained by its own task, which takes its next item only once the last
    one was consumed: a slow consumer leaves outputs in the engine's collector, which
    merges them, instead of in an unbounded queue here. `aclose()` (or an early stop)
    cancels the tasks, which closes the engine streams and so aborts their requests.
    With a `registry`, the merge is registered at once (before any chunk is sent), and
    `registry.drain()` makes it raise ServerShuttingDown.

    One iterator (the common case: n=1, one prompt) is read directly by the consumer, with
    no task and no queue between (one task switch per item instead of three); a drain then
    cancels the consumer's wait for the next item and turns it into ServerShuttingDown.
    """

    def __init__(self, *iterators: AsyncIterator[T],
                 registry: StreamRegistry | None = None) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._registry = registry
        self._single = len(iterators) == 1
        self._drained = False
        self._waiter: asyncio.Task[Any] | None = None  # the consumer, while it awaits one
        if registry is not None:
            registry.register(self._on_drain)
        self._iterators = iterators
        self._consumed = [asyncio.Event() for _ in iterators]
        self._tasks: list[asyncio.Future[None]] = []
        self._remaining = len(iterators)
        self._last: int | None = None
        self._closed = False

    async def _drain(self, index: int, iterator: AsyncIterator[T]) -> None:
        taken = self._consumed[index]
        queue = self._queue
        try:
            async for item in iterator:
                taken.clear()
                queue.put_nowait((index, item, None, False))
                await taken.wait()
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

    def _on_drain(self) -> None:
        self._drained = True
        if self._single:
            if self._waiter is not None:
                self._waiter.cancel()
        else:
            self._queue.put_nowait(_DRAIN)

    def __aiter__(self) -> MergedStreams[T]:
        return self

    async def _next_single(self) -> tuple[int, T]:
        if self._drained:
            await self.aclose()
            raise ServerShuttingDown("The server is shutting down; request aborted.")
        task = asyncio.current_task()
        self._waiter = task
        try:
            item = await self._iterators[0].__anext__()
        except StopAsyncIteration:
            self._waiter = None
            await self.aclose()
            raise
        except asyncio.CancelledError:
            self._waiter = None
            if not self._drained:
                await self.aclose()
                raise
            uncancel = getattr(task, "uncancel", None)  # Python >= 3.11
            if uncancel is not None:
                uncancel()
            await self.aclose()
            raise ServerShuttingDown("The server is shutting down; request aborted.") from None
        except BaseException:
            self._waiter = None
            await self.aclose()
            raise
        self._waiter = None
        return 0, item

    async def __anext__(self) -> tuple[int, T]:
        if self._closed:
            raise StopAsyncIteration
        if self._single:
            return await self._next_single()
        if not self._tasks:
            self._tasks = [asyncio.ensure_future(self._drain(i, it))
                           for i, it in enumerate(self._iterators)]
        if self._last is not None:
            self._consumed[self._last].set()
            self._last = None
        try:
            while self._remaining:
                entry = await self._queue.get()
                if entry is _DRAIN:
                    raise ServerShuttingDown("The server is shutting down; request aborted.")
                index, item, error, done = entry
                if error is not None:
                    raise error
                if done:
                    self._remaining -= 1
                    continue
                self._last = index
                return index, item
        except BaseException:
            await self.aclose()
            raise
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._registry is not None:
            self._registry.unregister(self._on_drain)
        if self._single:
            aclose = getattr(self._iterators[0], "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except BaseException:
                    logger.debug("closing an engine stream failed", exc_info=True)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


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
