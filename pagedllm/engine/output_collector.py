"""One request's pending output between the engine's output handler and its consumer.

The handler `put`s every step's RequestOutput; the consumer `get`s whatever is pending. A
consumer that reads slower than the engine produces finds several steps merged into one
output (DELTA outputs are concatenated, cumulative ones replaced), so nothing queues up
without bound and a slow client gets fewer, larger chunks.
"""

from __future__ import annotations

import asyncio

from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import RequestOutputKind


class RequestOutputCollector:
    """Holds at most one (merged) RequestOutput or an error for one request."""

    def __init__(self, output_kind: RequestOutputKind) -> None:
        self.delta = output_kind == RequestOutputKind.DELTA
        self.output: RequestOutput | None = None
        self.error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, output: RequestOutput | BaseException) -> None:
        if isinstance(output, BaseException):
            self.error = output
        elif self.output is None or not self.delta:
            self.output = output
        else:
            _merge_delta(self.output, output)
        self._ready.set()

    def get_nowait(self) -> RequestOutput | None:
        if self.error is not None:
            raise self.error
        output, self.output = self.output, None
        self._ready.clear()
        return output

    async def get(self) -> RequestOutput:
        while self.output is None and self.error is None:
            await self._ready.wait()
        output = self.get_nowait()
        assert output is not None
        return output


def _merge_delta(into: RequestOutput, new: RequestOutput) -> None:
    """Append DELTA output `new` to the pending `into` (same request)."""
    by_index = {c.index: c for c in into.outputs}
    for completion in new.outputs:
        held = by_index.get(completion.index)
        if held is None:
            into.outputs.append(completion)
            by_index[completion.index] = completion
            continue
        _merge_completion(held, completion)
    into.outputs.sort(key=lambda c: c.index)
    into.finished = new.finished
    if into.prompt_logprobs is None:
        into.prompt_logprobs = new.prompt_logprobs
    into.num_cached_tokens = new.num_cached_tokens or into.num_cached_tokens


def _merge_completion(held: CompletionOutput, new: CompletionOutput) -> None:
    held.text += new.text
    held.token_ids = held.token_ids + new.token_ids
    if new.logprobs is not None:
        held.logprobs = (held.logprobs or []) + new.logprobs
    held.cumulative_logprob = new.cumulative_logprob
    held.finish_reason = new.finish_reason
    held.stop_reason = new.stop_reason
