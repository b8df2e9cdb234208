"""The token history a verified position sees: a request's tokens plus the draft tokens
before it, so that penalties, bad words and min_tokens apply to each draft position as they
would without speculation."""

from __future__ import annotations

from typing import Any


class DraftPosition:
    """Request state `state` with `drafts` appended, read-only (the attributes the logits
    processors read)."""

    __slots__ = ("_state", "_drafts")

    def __init__(self, state: Any, drafts: list[int]) -> None:
        self._state = state
        self._drafts = drafts

    @property
    def sampling_params(self) -> Any:
        return self._state.sampling_params

    @property
    def eos_token_id(self) -> int | None:
        return self._state.eos_token_id

    @property
    def wants_logprobs(self) -> bool:
        return self._state.wants_logprobs

    @property
    def all_token_ids(self) -> list[int]:
        return self._state.all_token_ids + self._drafts

    @property
    def output_token_ids(self) -> list[int]:
        return self._state.output_token_ids + self._drafts

    @property
    def num_output_tokens(self) -> int:
        return self._state.num_output_tokens + len(self._drafts)


def position_states(state: Any, drafts: list[int], needs_history: bool) -> list[Any]:
    """One state per verified position of a request (1 + len(drafts)); the request's own
    state where no logits processor reads the history."""
    if not needs_history:
        return [state] * (1 + len(drafts))
    return [state] + [DraftPosition(state, drafts[:j]) for j in range(1, len(drafts) + 1)]
