"""Continuous batching in the style of vLLM V1.

Every step gives each request a number of new tokens to compute, under a token budget
(`max_num_batched_tokens`) and a cap on requests (`max_num_seqs`). Running requests go
first (decodes and unfinished prefill chunks), then waiting ones; long prompts are chunked.
When KV blocks run out, the newest running request is preempted: its blocks are freed and it
goes back to the front of the queue, to be recomputed later (prefix caching makes that cheap).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.engine.kv_cache_manager import KVCacheManager
from pagedllm.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute tokens [start, start + num_tokens)."""

    request: Request
    start: int  # = num_computed_tokens before the step
    num_tokens: int
    block_ids: list[int]

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so a token is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)  # since the last step
    # KV blocks to copy (src, dst) before this step's forward: copy-on-write of the partial
    # last prompt block for children forked off an n > 1 request.
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_free_blocks: int
    num_total_blocks: int
    num_cached_free_blocks: int
    prefix_queries: int
    prefix_hits: int
    num_preemptions: int


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int) -> None:
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        self.kv = KVCacheManager(num_blocks, cache_config.block_size,
                                 cache_config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        self._block_copies: list[tuple[int, int]] = []

    # ------------------------------------------------------------ queue
    def add_request(self, request: Request) -> None:
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_ids=self._finished_ids, block_copies=self._block_copies)
        self._finished_ids = []
        self._block_copies = []
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if req.num_pending and req.num_output_tokens + req.num_pending >= req.max_tokens:
                num_new = 0  # its last token is already being sampled
            if num_new <= 0:
                i += 1
                continue
            while True:
                if self.kv.allocate_slots(req, num_new) is not None:
                    break
                victim = self.running.pop()  # the newest running request
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # req itself was preempted: nothing more fits
            out.scheduled.append(ScheduledRequest(
                req, req.num_computed_tokens, num_new, self.kv.block_ids(req.request_id)))
            budget -= num_new
            i += 1

        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                if len(self.running) + len(req.pending_forks) >= self.config.max_num_seqs:
                    break  # its forks will need sequence slots too
                hits, num_hit_tokens = self.kv.get_computed_blocks(req)
                num_new = min(req.num_tokens - num_hit_tokens, budget)
                if self.kv.allocate_slots(req, num_new, hits) is None:
                    break
                self.waiting.popleft()
                req.num_computed_tokens = num_hit_tokens
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_hit_tokens
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.monotonic()
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                out.scheduled.append(ScheduledRequest(
                    req, num_hit_tokens, num_new, self.kv.block_ids(req.request_id)))
                budget -= num_new

        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------ update
    def mark_launched(self, out: SchedulerOutput) -> None:
        """Async scheduling: the step is on the device. Its tokens count as computed and its
        samples as pending, so the next step can be scheduled before they reach the host."""
        for item in out.scheduled:
            req = item.request
            req.num_computed_tokens += item.num_tokens
            if item.samples:
                req.num_pending += 1

    def update(self, out: SchedulerOutput, sampled: dict[str, int],
               launched: bool = False) -> list[Request]:
        """Advance the scheduled requests by their computed tokens (unless mark_launched
        did), append sampled tokens, apply token-level stop rules; returns requests that
        got a new token."""
        updated = []
        for item in out.scheduled:
            req = item.request
            if req.is_finished:
                continue
            if not launched:
                req.num_computed_tokens += item.num_tokens
            token = sampled.get(req.request_id)
            if token is None:
                continue  # a prefill chunk that does not reach the end of the prompt
            if launched:
                req.num_pending -= 1
            req.append_output_token(token)
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            if req.pending_forks:
                updated.extend(self._fork(req, sampled))
            self._check_stop(req, token)
            updated.append(req)
            if req.is_finished:
                self._free(req)
        return updated

    def _fork(self, parent: Request, sampled: dict[str, int]) -> list[Request]:
        """Start the other samples of an n > 1 request once its prompt is computed: each
        shares the parent's full prompt blocks by ref count and gets a copy of a partially
        filled last block (copied on the device before the next step writes into it).
        Returns the children that got their first token."""
        children, parent.pending_forks = parent.pending_forks, []
        parent.sampling_extras = parent.wants_logprobs or parent.wants_prompt_logprobs
        started = []
        for child in children:
            self.requests[child.request_id] = child
            token = sampled.get(child.request_id)
            if token is None:  # not sampled with the parent: runs as a request of its own
                self.waiting.append(child)
                continue
            child.append_output_token(token)
            child.first_scheduled_time = parent.first_scheduled_time
            child.first_token_time = parent.first_token_time
            child.num_cached_tokens = parent.num_cached_tokens
            started.append(child)
            self._check_stop(child, token)
            if child.is_finished:
                self._free(child)
                continue
            copies = self.kv.fork(parent, child)
            if copies is None:  # no block free for the copy: recompute later instead
                self.waiting.append(child)
                continue
            self._block_copies.extend(copies)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = RequestStatus.RUNNING
            self.running.append(child)
        return started

    def _check_stop(self, req: Request, token: int) -> None:
        params = req.sampling_params
        if req.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token == req.eos_token_id:
                req.status = RequestStatus.FINISHED_STOPPED
                return
            if token in params.all_stop_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                req.stop_reason = token
                return
        if req.num_output_tokens >= req.max_tokens:
            req.status = RequestStatus.FINISHED_LENGTH

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish (abort, or stop on a stop string) requests wherever they are."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                try:
                    self.waiting.remove(req)
                except ValueError:
                    pass
            req.status = status
            self._free(req)

    def _free(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:  # preempted while its last token was still pending
            self.waiting.remove(req)
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
        self._finished_ids.append(req.request_id)

    def stats(self) -> SchedulerStats:
        pool = self.kv.pool
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_usage=self.kv.usage,
            num_free_blocks=pool.num_free_blocks,
            num_total_blocks=pool.num_blocks,
            num_cached_free_blocks=pool.num_cached_free_blocks,
            prefix_queries=self.kv.prefix_queries,
            prefix_hits=self.kv.prefix_hits,
            num_preemptions=self.num_preemptions,
        )
