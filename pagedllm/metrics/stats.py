"""What the engine thread collects: one `IterationStats` per loop turn, one
`SchedulerSnapshot` of the queues and KV cache, and a `FinishedRequestStats` per finished
sequence (timestamps recorded on the `Request`).

The collector only does constant work per request that got a token this step (the first
token adds a TTFT sample, a finish adds one record); loggers turn it into rates, histograms
and log lines.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.engine.request import RequestStatus

if TYPE_CHECKING:
    from pagedllm.engine.request import Request
    from pagedllm.engine.scheduler import Scheduler

_FINISHED = RequestStatus.FINISHED_STOPPED  # statuses from here on are finished


@dataclass(frozen=True)
class FinishedRequestStats:
    """Latencies (seconds) and sizes of one finished sequence."""

    finish_reason: str
    e2e_latency: float  # arrival -> finish
    queued_time: float  # arrival -> first scheduled (the whole life if never scheduled)
    prefill_time: float  # first scheduled -> first token
    decode_time: float  # first token -> finish
    num_prompt_tokens: int
    num_generation_tokens: int

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between output tokens after the first; None below two tokens."""
        if self.num_generation_tokens < 2:
            return None
        return self.decode_time / (self.num_generation_tokens - 1)


@dataclass
class IterationStats:
    """What happened since the last `StatsCollector.take()` (usually one engine step)."""

    num_prompt_tokens: int = 0  # prompts whose prefill finished (first token sampled)
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)
    # Speculative decoding: requests that verified drafts, draft tokens verified, drafts
    # accepted, and accepted drafts by position (index j: the (j+1)-th draft of a run).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SchedulerSnapshot:
    """Queue lengths and KV cache state; the prefix and preemption counts are cumulative."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_total_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


class StatsCollector:
    """Accumulates per-step stats in the engine thread; `take()` hands them over."""

    def __init__(self) -> None:
        self._current = IterationStats()

    def record_step(self, updated: Iterable[Request]) -> None:
        """Count the token each request in `updated` got this step; finished ones are
        recorded with the step's time as their finish time."""
        # Plain attribute reads only: this runs every step over every decoding request.
        it = self._current
        now: float | None = None
        finished = _FINISHED
        n = 0
        for req in updated:
            n += req.num_new_tokens
            if len(req.output_token_ids) == req.num_new_tokens:  # first tokens: prefill done
                it.num_prompt_tokens += len(req.prompt_token_ids)
                if req.first_token_time is not None:
                    it.time_to_first_tokens.append(req.first_token_time - req.arrival_time)
            if req.status >= finished:
                now = now if now is not None else time.monotonic()
                self.record_finished(req, now)
        it.num_generation_tokens += n

    def record_spec_decode(self, drafts: dict[str, list[int]],
                           sampled: dict[str, list[int]]) -> None:
        """Count a verify step: per request its K drafts and how many were accepted (the
        tokens it kept, less the one sampled after them)."""
        it = self._current
        per_pos = it.spec_accepted_per_pos
        for rid, draft in drafts.items():
            tokens = sampled.get(rid)
            if not tokens:
                continue
            accepted = len(tokens) - 1
            it.spec_num_drafts += 1
            it.spec_num_draft_tokens += len(draft)
            it.spec_num_accepted_tokens += accepted
            if len(per_pos) < len(draft):
                per_pos.extend([0] * (len(draft) - len(per_pos)))
            for j in range(accepted):
                per_pos[j] += 1

    def record_finished(self, req: Request, now: float | None = None,
                        reason: str | None = None) -> None:
        """Stamp the finish time on `req` and keep its latency record (`reason` for a
        request about to be finished, e.g. "abort")."""
        now = time.monotonic() if now is None else now
        req.finished_time = now
        scheduled = req.first_scheduled_time
        first_token = req.first_token_time
        self._current.finished.append(FinishedRequestStats(
            finish_reason=reason or req.finish_reason or "abort",
            e2e_latency=now - req.arrival_time,
            queued_time=(scheduled if scheduled is not None else now) - req.arrival_time,
            prefill_time=(first_token - scheduled
                          if first_token is not None and scheduled is not None else 0.0),
            decode_time=now - first_token if first_token is not None else 0.0,
            num_prompt_tokens=req.num_prompt_tokens,
            num_generation_tokens=req.num_output_tokens,
        ))

    def take(self) -> IterationStats:
        """The stats gathered since the last call (a fresh object starts)."""
        current, self._current = self._current, IterationStats()
        return current

    @staticmethod
    def snapshot(scheduler: Scheduler) -> SchedulerSnapshot:
        """Constant-time view of the scheduler (no walk over blocks or requests)."""
        kv = scheduler.kv
        return SchedulerSnapshot(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=kv.usage,
            num_total_blocks=kv.num_blocks,
            prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits,
            num_preemptions=scheduler.num_preemptions,
        )
