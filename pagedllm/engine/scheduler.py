"""Continuous batching in the style of vLLM V1.

Every step gives each request a number of new tokens to compute, under a token budget
(`max_num_batched_tokens`) and a cap on requests (`max_num_seqs`). Running requests go
first (decodes and unfinished prefill chunks), then waiting ones; long prompts are chunked.
When KV blocks run out, the newest running request is preempted: its blocks are freed and it
goes back to the front of the queue, to be recomputed later (prefix caching makes that cheap).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.engine.kv_cache_manager import KVCacheManager
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams, SamplingType
from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.ngram_proposer import NgramProposer
from pagedllm.worker.logits_processors import needs_processing

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledRequest:
    """The scheduler's own record of one request's share of a step: compute tokens
    [start, start + num_tokens). ``samples`` is fixed when scheduled: the chunk reaches the
    end of the known tokens, so a token is sampled. The model runner never reads this (it
    gets the typed data below)."""

    request: Request
    start: int  # = num_computed_tokens before the step
    num_tokens: int  # the draft tokens included
    samples: bool = False
    draft_token_ids: list[int] | tuple[()] = ()  # verified this step


@dataclass
class NewRequestData:
    """A request the model runner has not seen (first scheduled, resumed after preemption,
    or a forked sample joining): everything it needs, in full."""

    request_id: str
    token_ids: list[int]  # prompt + output tokens known on the host (a copy)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    eos_token_id: int | None
    block_ids: list[int]


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already holds: only what changed (KV blocks added, or cut after
    a rollback). Its new tokens are the ones the runner sampled itself."""

    request_id: str
    new_block_ids: list[int]
    # >= 0: first cut the block row to this many blocks (rejected draft tokens' blocks
    # were freed), then add new_block_ids.
    num_kept_blocks: int = -1


@dataclass
class SchedulerOutput:
    """One step, as the model runner sees it.

    The batch is ``req_ids`` in order; request i computes ``num_scheduled_tokens[i]``
    tokens from position ``num_computed_tokens[i]`` and samples when ``samples[i]``. Sampled
    requests take logits rows in batch order (``sampling_ids``); ``grammar_rows`` maps the
    constrained ones to their row (their bitmask is filled later, while the forward runs).
    ``forks`` lists the samples of an n > 1 request that draw their first token from its row.
    ``scheduled_draft_tokens``: speculative decoding's proposals per decoding request; such a
    request computes its last token and the K drafts (1 + K scheduled tokens) and takes
    1 + K logits rows (one per position verified), so ``grammar_rows`` gives its first.
    """

    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    req_ids: list[str] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)
    scheduled_draft_tokens: dict[str, list[int]] = field(default_factory=dict)
    grammar_rows: dict[str, int] = field(default_factory=dict)
    forks: dict[str, list[tuple[str, SamplingParams]]] = field(default_factory=dict)
    # True when a sampled request's logits depend on the previous step's tokens on the host
    # (grammar, penalties, bad words, min_tokens): the step in flight is collected after
    # this one's forward is launched and before its logits pipeline runs.
    needs_host_tokens: bool = False
    num_batched_tokens: int = 0
    preempted: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)  # since the last step
    # KV blocks to copy (src, dst) before this step's forward: copy-on-write of the partial
    # last prompt block for children forked off an n > 1 request.
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # The scheduler's side (Scheduler.update); not part of the runner's contract.
    scheduled: list[ScheduledRequest] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.req_ids

    @property
    def sampling_ids(self) -> list[str]:
        """Ids of the requests that sample, in logits-row order."""
        return [rid for rid, s in zip(self.req_ids, self.samples) if s]


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
                 num_blocks: int, speculative: SpeculativeConfig | None = None) -> None:
        self.config = scheduler_config
        self.speculative = speculative
        # n-gram proposals are made here, from the request's tokens; a draft model's come
        # from the model runner (Request.spec_token_ids). A draft model writes its
        # proposals' KV past a sampled request's tokens: K lookahead slots.
        self.ngram: NgramProposer | None = None
        self.num_lookahead = 0
        if speculative is not None and speculative.method == "ngram":
            lo, hi = speculative.lookup_range
            self.ngram = NgramProposer(speculative.num_speculative_tokens, lo, hi)
        elif speculative is not None:
            self.num_lookahead = speculative.num_speculative_tokens
        self.block_size = cache_config.block_size
        self.kv = KVCacheManager(num_blocks, cache_config.block_size,
                                 cache_config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        self._block_copies: list[tuple[int, int]] = []
        # Requests finished while waiting (a grammar that failed to compile): the engine
        # reports them with its next outputs.
        self.failed: list[Request] = []

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
        speculating = self.speculative is not None

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if req.num_pending and (req.num_output_tokens + req.num_pending >= req.max_tokens
                                    or req.pending_forks):
                # Its last token is already being sampled; or its first token is, and its
                # other samples fork off it once that token is known (at its computed length).
                num_new = 0
            if num_new <= 0:
                i += 1
                continue
            drafts: list[int] = []
            lookahead = 0
            if speculating:
                if num_new == 1:
                    drafts = self._drafts(req, budget)
                req.spec_token_ids = []
                end = req.num_computed_tokens + num_new
                if end == req.num_tokens:
                    lookahead = self._lookahead(end + len(drafts))
            while True:
                if self.kv.allocate_slots(req, num_new + len(drafts),
                                          num_lookahead_tokens=lookahead) is not None:
                    break
                if drafts or lookahead:  # fewer slots before preempting anyone
                    drafts, lookahead = [], 0
                    continue
                victim = self.running.pop()  # the newest running request
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # req itself was preempted: nothing more fits
            out.scheduled.append(self._item(req, req.num_computed_tokens, num_new, drafts))
            budget -= num_new + len(drafts)
            i += 1

        if not out.preempted:
            skipped: list[Request] = []  # waiting for their grammar: others go ahead
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                so = req.structured_output_request
                if so is not None and not so.is_ready():
                    skipped.append(self.waiting.popleft())
                    continue
                if so is not None and so.error is not None:
                    self.waiting.popleft()
                    logger.error("Request %s: its grammar failed to compile: %s",
                                 req.request_id, so.error)
                    req.status = RequestStatus.FINISHED_ABORTED
                    self._free(req)
                    self.failed.append(req)
                    continue
                if len(self.running) + len(req.pending_forks) >= self.config.max_num_seqs:
                    break  # its forks will need sequence slots too
                hits, num_hit_tokens = self.kv.get_computed_blocks(req)
                num_new = min(req.num_tokens - num_hit_tokens, budget)
                end = num_hit_tokens + num_new
                lookahead = self._lookahead(end) if end == req.num_tokens else 0
                if self.kv.allocate_slots(req, num_new, hits, lookahead) is None:
                    break
                self.waiting.popleft()
                req.num_computed_tokens = num_hit_tokens
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_hit_tokens
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.monotonic()
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                out.scheduled.append(self._item(req, num_hit_tokens, num_new))
                budget -= num_new
            self.waiting.extendleft(reversed(skipped))

        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        self._runner_view(out)
        return out

    @staticmethod
    def _item(req: Request, start: int, num_tokens: int,
              drafts: list[int] | None = None) -> ScheduledRequest:
        if drafts:
            return ScheduledRequest(req, start, num_tokens + len(drafts), True, drafts)
        return ScheduledRequest(req, start, num_tokens, start + num_tokens == req.num_tokens)

    def _drafts(self, req: Request, budget: int) -> list[int]:
        """The draft tokens to verify for a decoding request this step: the proposal, cut
        to what the request may still generate (its last token is always sampled, so
        max_tokens and max_model_len hold), the token budget, its first stop token and the
        prefix its grammar accepts (see below for sampled drafts). Requests still
        prefilling, or whose first token forks n > 1 samples, get none."""
        spec = self.speculative
        if (spec is None or req.num_pending or req.pending_forks
                or req.num_computed_tokens < req.num_prompt_tokens):
            return []
        k = min(spec.num_speculative_tokens, budget - 1,
                req.max_tokens - req.num_output_tokens - 1)
        if k <= 0:
            return []
        if self.ngram is not None:
            drafts = self.ngram.propose(req.request_id, req.all_token_ids, k)
        else:
            drafts = req.spec_token_ids[:k]
        if not drafts:
            return drafts
        params = req.sampling_params
        stops = params.all_stop_token_ids
        for i, token in enumerate(drafts):
            if token in stops or (token == req.eos_token_id and not params.ignore_eos):
                drafts = drafts[:i + 1]  # a stop token ends the run: nothing to verify after it
                break
        so = req.structured_output_request
        if so is not None and drafts:
            grammar = so.grammar
            if grammar.is_terminated():
                return []
            valid = grammar.validate_tokens(drafts)
            # A sampled draft model's first refused draft stays, to be rejected (the
            # grammar's mask gives it p = 0): cutting it would leave the position to p
            # instead of the residual max(p - q, 0), off the target's distribution.
            # A point-mass proposal (n-gram, greedy) refused is p at that position either way.
            sampled_q = self.ngram is None and params.sampling_type != SamplingType.GREEDY
            drafts = drafts[:valid + 1 if sampled_q else valid]
        return drafts

    def _lookahead(self, end: int) -> int:
        """Slots past position `end` (where a sampling request's scheduled tokens end) for
        the draft model's proposals; none beyond max_model_len."""
        if not self.num_lookahead:
            return 0
        return max(0, min(self.num_lookahead, self.config.max_model_len - end))

    def _runner_view(self, out: SchedulerOutput) -> None:
        """Fill the typed per-request data of the model runner's contract."""
        row = 0
        for item in out.scheduled:
            req = item.request
            rid = req.request_id
            blocks = self.kv.block_ids(rid)
            if req.num_runner_blocks < 0:  # the runner does not hold it
                out.new_requests.append(NewRequestData(
                    rid, list(req.all_token_ids), req.num_prompt_tokens, req.sampling_params,
                    req.eos_token_id, list(blocks)))
            else:
                out.cached_requests.append(CachedRequestData(
                    rid, blocks[req.num_runner_blocks:], req.runner_block_cut))
            req.runner_block_cut = -1
            req.num_runner_blocks = len(blocks)
            out.req_ids.append(rid)
            out.num_scheduled_tokens.append(item.num_tokens)
            out.num_computed_tokens.append(item.start)
            out.samples.append(item.samples)
            if not item.samples:
                continue
            if item.draft_token_ids:
                out.scheduled_draft_tokens[rid] = item.draft_token_ids
            if req.structured_output_request is not None:
                out.grammar_rows[rid] = row
                out.needs_host_tokens = True
            elif not out.needs_host_tokens and needs_processing(req):
                out.needs_host_tokens = True
            if req.pending_forks:
                out.forks[rid] = [(c.request_id, c.sampling_params) for c in req.pending_forks]
            row += 1 + len(item.draft_token_ids)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_runner_blocks = -1  # the runner drops it (out.preempted)
        req.runner_block_cut = -1
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------ update
    def mark_launched(self, out: SchedulerOutput) -> None:
        """The step goes to the device: its tokens count as computed and its samples as
        pending, so the next step can be scheduled before they reach the host (async
        scheduling) and `update` finds every step in the same state."""
        for item in out.scheduled:
            req = item.request
            req.num_computed_tokens += item.num_tokens
            if item.samples:
                req.num_pending += 1

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]],
               proposals: dict[str, list[int]] | None = None) -> list[Request]:
        """Append a launched step's sampled tokens (a list per request), apply token-level
        stop rules (and the grammar's end), roll back the slots of rejected draft tokens;
        returns requests that got new tokens. `proposals`: a draft model's drafts for each
        request's next step."""
        updated = []
        for item in out.scheduled:
            req = item.request
            if not item.samples:
                continue  # a prefill chunk that does not reach the end of the prompt
            req.num_pending -= 1
            tokens = sampled.get(req.request_id)
            if req.is_finished or not tokens:
                continue
            num_before = req.num_output_tokens
            for token in tokens:
                self._append(req, token)
                if req.is_finished:
                    break
            req.num_new_tokens = req.num_output_tokens - num_before
            num_rejected = len(item.draft_token_ids) - (len(tokens) - 1)
            if num_rejected > 0 and not req.is_finished:
                self._rollback(req, num_rejected)
            if proposals and not req.is_finished:
                req.spec_token_ids = proposals.get(req.request_id, [])
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            if req.pending_forks:
                updated.extend(self._fork(req, sampled))
            updated.append(req)
            if req.is_finished:
                self._free(req)
        return updated

    def _rollback(self, req: Request, num_rejected: int) -> None:
        """Rejected draft tokens were computed into KV slots: they no longer count, and
        blocks past the request's known tokens go back to the pool (the runner cuts its
        block row in the next step that schedules the request)."""
        req.num_computed_tokens -= num_rejected
        kept = self.kv.rollback(req, req.num_tokens)
        if kept < req.num_runner_blocks:
            req.num_runner_blocks = kept
            req.runner_block_cut = (kept if req.runner_block_cut < 0
                                    else min(kept, req.runner_block_cut))

    def _fork(self, parent: Request, sampled: dict[str, list[int]]) -> list[Request]:
        """Start the other samples of an n > 1 request once its prompt is computed: each
        shares the parent's full prompt blocks by ref count and gets a copy of a partially
        filled last block (copied on the device before the next step writes into it).
        Returns the children that got their first token."""
        children, parent.pending_forks = parent.pending_forks, []
        started = []
        for child in children:
            self.requests[child.request_id] = child
            tokens = sampled.get(child.request_id)
            if not tokens:  # not sampled with the parent: runs as a request of its own
                self.waiting.append(child)
                continue
            for token in tokens:
                self._append(child, token)
                if child.is_finished:
                    break
            child.num_new_tokens = child.num_output_tokens
            child.first_scheduled_time = parent.first_scheduled_time
            child.first_token_time = parent.first_token_time
            child.num_cached_tokens = parent.num_cached_tokens
            started.append(child)
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

    def _append(self, req: Request, token: int) -> None:
        """One new output token: into the request, its grammar, and the stop rules."""
        req.append_output_token(token)
        so = req.structured_output_request
        if so is not None:
            if not so.accept_tokens([token]):
                # Only a conflicting rule (e.g. min_tokens banning the one stop token the
                # grammar allows) leaves the mask empty; the output so far is valid.
                logger.warning("Request %s: the grammar rejected token %d; finishing it.",
                               req.request_id, token)
                req.status = RequestStatus.FINISHED_STOPPED
                return
            if so.is_terminated():
                req.status = RequestStatus.FINISHED_STOPPED
                if token != req.eos_token_id and token in req.sampling_params.all_stop_token_ids:
                    req.stop_reason = token
                return
        self._check_stop(req, token)

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
        if self.ngram is not None:
            self.ngram.forget(req.request_id)
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
