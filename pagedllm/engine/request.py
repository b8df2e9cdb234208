"""A request as the scheduler sees it: tokens, progress, KV blocks, status."""

from __future__ import annotations

import enum
import time
from typing import Any

from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5


# finish_reason by status value: a tuple index, since an IntEnum hashes in Python (a dict
# keyed by status cost ~3 us per lookup, read for every request every step).
_FINISH_REASON_BY_STATUS: tuple[str | None, ...] = (None, None, None, "stop", "length", "abort")
_FIRST_FINISHED = int(RequestStatus.FINISHED_STOPPED)


class Request:
    """One sequence being generated (a parent request with n > 1 has n of these)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, eos_token_id: int | None,
                 arrival_time: float | None = None, max_total_tokens: int | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # Tokens sampled by a launched step whose ids have not reached the host yet (async
        # scheduling): they count as known tokens for scheduling, not in all_token_ids.
        self.num_pending = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first scheduling; -1 = not yet
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        max_tokens = sampling_params.max_tokens
        limit = max_total_tokens - len(prompt_token_ids) if max_total_tokens else None
        if max_tokens is None or (limit is not None and limit < max_tokens):
            max_tokens = limit
        self.max_tokens: int = max_tokens if max_tokens is not None else 1 << 30
        self.block_hashes: list[bytes] = []  # hashes of this request's full blocks
        # The other samples of an n > 1 / best_of request: forked off this one (sharing its
        # KV blocks) in the step that samples its first token.
        self.pending_forks: list[Request] = []
        self.wants_logprobs = sampling_params.wants_logprobs
        self.wants_prompt_logprobs = sampling_params.prompt_logprobs is not None
        # KV blocks of this request the model runner holds (-1: the runner does not hold
        # the request, so it is sent in full the next time it is scheduled).
        self.num_runner_blocks = -1
        self.num_new_tokens = 0  # output tokens the last update appended
        # Speculative decoding: a draft model's proposal for the next step (from the model
        # runner), and the block count the runner must cut its block row to after a
        # rollback of rejected draft tokens (-1: no cut pending).
        self.spec_token_ids: list[int] = []
        self.runner_block_cut = -1
        # Its grammar (a StructuredOutputRequest), when the request is constrained.
        self.structured_output_request: Any = None
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None  # set by the engine's stats collector

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence so far, including sampled ones still on the device."""
        return len(self.all_token_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.status >= _FIRST_FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON_BY_STATUS[self.status]
